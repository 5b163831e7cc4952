"""W&B sweep specs (``sweeps/*.yaml``): each renders, as ``wandb agent`` renders it, to a prunelab command
that composes and validates; one rendered job runs for real in offline mode; ``optimized_metric``."""

from __future__ import annotations

import itertools
import math
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from prunelab.cli import CONFIG_DIR
from prunelab.config.schema import ConfigError, validate
from prunelab.tracking.wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "sweeps").glob("*.yaml"))


def _assignments(spec: dict) -> list[dict]:
    """Parameter assignments covering the spec: every grid point; for a search, each listed value and each
    distribution's bounds (one parameter varied at a time from the first choice of the others)."""
    choices = {}
    for key, param in spec["parameters"].items():
        if "value" in param:
            choices[key] = [param["value"]]
        elif "values" in param:
            choices[key] = list(param["values"])
        else:
            choices[key] = [param["min"], param["max"]]
    if spec["method"] == "grid":
        return [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]
    first = {k: v[0] for k, v in choices.items()}
    return [dict(first, **{k: value}) for k, values in choices.items() for value in values]


def _render(spec: dict, assignment: dict) -> list[str]:
    """The argv ``wandb agent`` runs for one assignment (its own renderer; ``${env}`` dropped)."""
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in assignment.items()}})["args_no_hyphens"]
    argv: list[str] = []
    for chunk in spec["command"]:
        if chunk == "${args_no_hyphens}":
            argv += args
        elif chunk != "${env}":
            argv.append(chunk)
    return argv


def test_there_are_sweep_specs_and_none_lives_in_conf():
    assert len(SPECS) >= 3
    assert not list((REPO / "prunelab" / "conf").rglob("*sweep*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_spec_renders_to_prunelab_commands_that_compose_and_validate(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["metric"]["name"] == "objective" and spec["metric"]["goal"] in ("minimize", "maximize")
    assert "${args_no_hyphens}" in spec["command"]
    assignments = _assignments(spec)
    assert assignments
    for assignment in assignments:
        argv = _render(spec, assignment)
        assert argv[:3] == ["python", "-m", "prunelab"]
        overrides = argv[3:]
        assert "logger=wandb" in overrides and "logger.mode=online" in overrides  # logs into the sweep
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        validate(cfg)  # every key exists, every value is allowed, optimized_metric names a computed metric
        for key, value in assignment.items():  # the swept value arrived where the key says
            if key in ("experiment", "logger", "method", "allocation") or key.startswith("hydra."):
                continue  # group selections (the group's file decides the node) and Hydra's own settings
            node = cfg
            for part in key.split("."):
                node = node[part] if part in node else None
            if isinstance(value, list):
                assert list(node) == value, key
            else:
                assert node == (pytest.approx(value) if isinstance(value, float) else value), key


def test_a_rendered_agent_job_runs_offline_and_reports_its_objective(tmp_path, cache_dir, data_root, tiny_hf_dir):
    spec = yaml.safe_load((REPO / "sweeps" / "methods.yaml").read_text())
    argv = _render(spec, _assignments(spec)[0])  # experiment=cpu-budget ... method=magnitude sparsity=0.5
    assert "method=magnitude" in argv and "sparsity=0.5" in argv
    small = ["model=hf", f"model.path={tiny_hf_dir}", "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=2",
             f"hydra.run.dir={tmp_path / 'job'}"]  # test scale, appended after the rendered overrides
    env = dict(os.environ, WANDB_MODE="offline", PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir),
               WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, *argv[1:], *small], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "job" / "results.json").read_text())
    ppl = results["metrics"]["perplexity"]["wikitext2"]["ppl"]
    assert results["objective"] == {"metric": "perplexity.wikitext2.ppl", "value": ppl}
    assert results["config"]["logger"]["mode"] == "online"  # the spec's setting, overridden by WANDB_MODE only
    offline = list((tmp_path / "job" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    summary = read_offline_run(offline[0])["summary"]
    assert summary["objective"] == pytest.approx(ppl) and summary["objective/perplexity.wikitext2.ppl"] == pytest.approx(ppl)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optimized_metric=perplexity.c4.ppl"], "perplexity paths read perplexity.<dataset>.ppl"),
        (["optimized_metric=zeroshot.mean_acc"], "computes no zeroshot metrics"),
        (["optimized_metric=accuracy"], "no metrics group 'accuracy'"),
        (["optimized_metric=sparsity.overall"], "computes no sparsity metrics"),  # a dense run prunes nothing
        (["optimized_metric=1"], "must be a dotted path"),
    ],
)
def test_an_objective_the_run_does_not_compute_is_refused_before_loading(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(_compose(*overrides))


def test_objective_reads_the_named_paths():
    from prunelab.tracking.objective import objective, summary_entries

    metrics = {"perplexity": {"c4": {"ppl": 12.5}}, "latency": {"decode": {"ms_per_token": {"median": 40.0}}}}
    single = objective(metrics, ["perplexity.c4.ppl"])
    assert single == {"metric": "perplexity.c4.ppl", "value": 12.5}
    both = objective(metrics, ["perplexity.c4.ppl", "latency.decode.ms_per_token.median"])
    assert both["value"] == [12.5, 40.0]
    assert summary_entries(both) == {"objective": 12.5, "objective/perplexity.c4.ppl": 12.5,
                                     "objective/latency.decode.ms_per_token.median": 40.0}
    assert math.isnan(objective(metrics, ["perplexity.wikitext2.ppl"])["value"])  # not recorded: NaN, with a warning
