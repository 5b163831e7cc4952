"""Paper-table presets (``prunelab/conf/experiment/*-table.yaml``) and the union-of-grids sweeper they use."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prunelab.cli import CONFIG_DIR
from prunelab.config.schema import validate
from prunelab.sweeper import expand

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "prunelab" / "conf" / "experiment").glob("*-table.yaml"))


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _jobs(preset: str) -> list[list[str]]:
    sweeper = _compose(f"experiment={preset}", hydra=True).hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.prunelab_sweeper.grids.GridsSweeper"
    return expand([], OmegaConf.to_container(sweeper.params) if sweeper.params else None,
                  OmegaConf.to_container(sweeper.grids))


def test_the_presets_named_by_the_papers_exist():
    assert {"sparsegpt-table", "wanda-table", "owl-table", "structured-table", "shortgpt-table",
            "cpu-budget-table"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_composes_and_validates(preset):
    jobs = _jobs(preset)
    assert len(jobs) == len({tuple(sorted(j)) for j in jobs}) > 1
    for job in jobs:
        cfg = _compose(f"experiment={preset}", *job)
        validate(cfg)
        assert cfg.experiment == preset


def test_sparsegpt_table_is_dense_plus_methods_times_patterns_at_the_papers_protocol():
    jobs = {tuple(sorted(o.replace("\\:", ":") for o in j)) for j in _jobs("sparsegpt-table")}  # Hydra escapes ':'
    expected = {("method=dense",)} | {tuple(sorted((f"method={m}", f"pattern={p}")))
                                      for m, p in itertools.product(("magnitude", "wanda", "sparsegpt"),
                                                                    ("unstructured", "4:8", "2:4"))}
    assert jobs == expected
    cfg = _compose("experiment=sparsegpt-table")
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.source) == (128, 2048, "c4")
    assert list(cfg.eval.perplexity.datasets) == ["wikitext2", "c4"] and cfg.eval.perplexity.seqlen == 2048
    assert cfg.eval.perplexity.max_windows is None and cfg.sparsity == 0.5


def test_cpu_budget_table_has_three_calibration_seeds_for_wanda_and_sparsegpt_at_half():
    jobs = [dict(o.split("=", 1) for o in job) for job in _jobs("cpu-budget-table")]
    assert len(jobs) == 1 + 3 + 6 + 12 + 4
    for method in ("wanda", "sparsegpt"):
        seeds = {j.get("calib.seed", "0") for j in jobs if j["method"] == method and j.get("sparsity") == "0.5"
                 and "pattern" not in j}
        assert seeds == {"0", "1", "2"}
    assert not any("calib.seed" in j for j in jobs if j["method"] in ("magnitude", "dense"))
    cfg = _compose("experiment=cpu-budget-table")
    assert (cfg.calib.nsamples, cfg.calib.seqlen, cfg.eval.name, cfg.eval.perplexity.max_windows) == (32, 2048, "cpu-budget", 32)


def test_the_command_line_narrows_every_grid():
    grids = [{"method": "dense"}, {"method": "magnitude,wanda", "sparsity": "0.5,0.6"}]
    jobs = expand(["method=wanda"], None, grids)  # the command line comes last: method=wanda everywhere
    assert jobs == [["method=wanda"], ["method=wanda", "sparsity=0.5"], ["method=wanda", "sparsity=0.6"]]


def test_a_grids_sweep_runs_the_union_in_order_and_the_report_finds_every_planned_job(tmp_path, cache_dir, data_root,
                                                                                         tiny_hf_dir):
    from prunelab.report import build_report

    extra = tmp_path / "conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "tiny-table.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: grids\nexperiment: tiny-table\n"
        "hydra:\n  sweeper:\n    grids:\n      - {method: dense}\n      - {method: magnitude, sparsity: '0.3,0.6'}\n"
        "      - {method: 'dense,magnitude', sparsity: '0.3'}\n"  # repeats magnitude at 0.3: runs once
        "      - {method: magnitude, sparsity: '0.3', pattern: unstructured}\n")  # the same run, other words
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "prunelab", "-m", f"--config-dir={tmp_path / 'conf'}",
                           "experiment=tiny-table", "model=hf", f"model.path={tiny_hf_dir}", "logger=none",
                           "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=1", f"hydra.sweep.dir={sweep}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    names = [p.name for p in jobs]
    assert len(names) == 4 and names[0].startswith("0_dense") and names[1].startswith("1_magnitude_0.3")
    assert names[2].startswith("2_magnitude_0.6") and names[3].startswith("3_dense")  # dense at sparsity 0.3 is new
    planned = OmegaConf.to_container(OmegaConf.load(sweep / "planned_jobs.yaml"))
    assert len(planned) == 4  # the sweeper composed each job and dropped the one equal to an earlier job
    report = build_report(sweep, plots=False)
    assert report["runs"] == 4 and report["never_launched"] == [] and report["incomplete"] == []


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "prunelab" / "conf" / "experiment").glob("*.yaml")))
def test_a_presets_own_values_win_over_the_main_config_and_the_command_line_over_both(preset):
    import yaml

    own = yaml.safe_load((REPO / "prunelab" / "conf" / "experiment" / f"{preset}.yaml").read_text())
    cfg = _compose(f"experiment={preset}", hydra=True)
    for key, value in own.items():
        if key in ("defaults", "hydra") or isinstance(value, dict):
            continue
        assert OmegaConf.to_container(cfg)[key] == value, key  # e.g. owl-table's sparsity 0.7, not the default 0.5
    assert cfg.hydra.sweep.dir.startswith("multirun/") or preset == "cpu-budget"
    assert _compose(f"experiment={preset}", "sparsity=0.65").sparsity == 0.65
