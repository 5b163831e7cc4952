"""A sweep run again: jobs whose complete results.json is for the same config are skipped (and said to be),
failed jobs run again, ``redo=true`` runs everything; results of another config are never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from prunelab.cli import CONFIG_DIR
from prunelab.report import build_report

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cache_dir: Path, data_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "prunelab", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _stamp(path: Path) -> tuple[int, bytes]:
    return path.stat().st_mtime_ns, path.read_bytes()


def test_a_sweep_run_again_skips_finished_jobs_and_runs_the_failed_one_again(tmp_path, cache_dir, data_root, tiny_hf_dir):
    sweep = tmp_path / "sweep"
    grid = ["-m", "model=hf", f"model.path={tiny_hf_dir}", "method=magnitude", "sparsity=0.3,0.5,1.5", "logger=none",
            "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=2", f"hydra.sweep.dir={sweep}"]
    first = _cli(*grid, cache_dir=cache_dir, data_root=data_root)
    assert first.returncode == 1, first.stderr[-3000:]  # sparsity=1.5 fails; the others finish
    folder = {p.name.split("_")[0]: p for p in sweep.iterdir() if p.is_dir()}  # job number -> its folder
    done = {job: _stamp(folder[job] / "results.json") for job in ("0", "1")}
    assert (folder["2"] / "failed.json").is_file() and not (folder["2"] / "results.json").exists()
    failed_before = _stamp(folder["2"] / "failed.json")

    again = _cli(*grid, cache_dir=cache_dir, data_root=data_root)
    assert again.returncode == 1, again.stderr[-3000:]
    for job, stamp in done.items():
        assert _stamp(folder[job] / "results.json") == stamp, f"job {job} ran again"
        skipped = json.loads((folder[job] / "skipped.json").read_text())
        assert skipped["status"] == "skipped"
    assert _stamp(folder["2"] / "failed.json") != failed_before  # the failed job was tried again
    assert "2 skipped" in again.stdout + again.stderr
    report = build_report(sweep, plots=False)
    assert report["skipped"] == [folder["0"].name, folder["1"].name] and report["incomplete"] == [folder["2"].name]
    markdown = report["markdown"].read_text()
    assert "## Skipped (complete before the last invocation)" in markdown and f"- `{folder['0'].name}`" in markdown

    redo = _cli(*grid[:4], "sparsity=0.3", *grid[5:], "redo=true", cache_dir=cache_dir, data_root=data_root)
    assert redo.returncode == 0, redo.stderr[-3000:]  # this invocation's one job completed
    assert "not this invocation's job, not counted" in redo.stdout + redo.stderr  # job 2's failure is still named
    assert _stamp(folder["0"] / "results.json") != done["0"]  # ran for real
    assert not (folder["0"] / "skipped.json").exists()
    assert json.loads((folder["0"] / "results.json").read_text())["config"]["sparsity"] == 0.3


def _compose(tiny_hf_dir, data_root, cache, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["model=hf", f"model.path={tiny_hf_dir}", "logger=none", "method=magnitude",
                                            "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=2",
                                            f"data_root={data_root}", f"cache_dir={cache}", *overrides])


def test_results_of_another_config_are_never_replaced_and_incomplete_ones_never_trusted(tmp_path, tiny_hf_dir,
                                                                                       data_root):
    from prunelab import runner
    from prunelab.config.schema import ConfigError

    run_dir = tmp_path / "run"
    first = runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.3"), run_dir)
    stamp = _stamp(run_dir / "results.json")
    same = runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.3",
                               "optimized_metric=sparsity.overall"), run_dir)
    assert (run_dir / "skipped.json").is_file() and _stamp(run_dir / "results.json") == stamp
    assert same["metrics"]["perplexity"]["wikitext2"]["ppl"] == first["metrics"]["perplexity"]["wikitext2"]["ppl"]
    assert same["objective"] == {"metric": "sparsity.overall", "value": first["metrics"]["sparsity"]["overall"]}
    with pytest.raises(ConfigError, match="holds the complete results of another config.*redo=true"):
        runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.6"), run_dir)
    assert _stamp(run_dir / "results.json") == stamp and not (run_dir / "failed.json").exists()  # untouched
    other = runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.6", "redo=true"), run_dir)
    assert not (run_dir / "skipped.json").exists() and other["config"]["sparsity"] == 0.6
    payload = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps(dict(payload, status="running")))  # not complete
    rerun = runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.6"), run_dir)
    assert not (run_dir / "skipped.json").exists() and json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    assert rerun["metrics"]["sparsity"] == other["metrics"]["sparsity"]


def test_an_edited_metric_in_results_json_is_not_served_to_a_rerun(tmp_path, tiny_hf_dir, data_root):
    """A complete results.json whose numbers changed after it was written is computed again, not skipped."""
    from prunelab import runner

    run_dir = tmp_path / "run"
    first = runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.3"), run_dir)
    payload = json.loads((run_dir / "results.json").read_text())
    payload["metrics"]["perplexity"]["wikitext2"]["ppl"] = 1.0  # still valid JSON, still "complete"
    (run_dir / "results.json").write_text(json.dumps(payload))
    again = runner.run(_compose(tiny_hf_dir, data_root, tmp_path / "cache", "sparsity=0.3"), run_dir)
    assert not (run_dir / "skipped.json").exists()
    assert again["metrics"]["perplexity"]["wikitext2"]["ppl"] == first["metrics"]["perplexity"]["wikitext2"]["ppl"] != 1.0
    assert json.loads((run_dir / "results.json").read_text())["metrics"]["perplexity"]["wikitext2"]["ppl"] != 1.0


def test_the_fingerprint_reads_the_same_from_the_live_config_and_from_results_json():
    from prunelab.tracking.results import config_fingerprint

    config = {"allocation": {"name": "explicit", "layers": {"0-5": 0.3, 7: 0.5, 12: 0.6}}, "sparsity": 0.5,
              "logger": {"mode": "online"}}
    reread = json.loads(json.dumps(config))  # keys become strings, as in results.json
    assert config_fingerprint(config) == config_fingerprint(reread)
    assert config_fingerprint(config) == config_fingerprint(dict(config, logger={"mode": "offline"}, redo=True))
    assert config_fingerprint(config) != config_fingerprint(dict(config, sparsity=0.6))
