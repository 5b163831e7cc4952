"""Hydra's Optuna sweeper and submitit launcher, for real on this machine with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = ["logger=none", "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=2", "calib.nsamples=2",
        "calib.seqlen=64"]


def _cli(*args: str, cache_dir: Path, data_root: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "prunelab", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _results(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]


def test_optuna_searches_owl_and_reports_the_best_trial(tmp_path, cache_dir, data_root, tiny_hf_dir):
    sweep = tmp_path / "owl"
    proc = _cli("-m", "experiment=owl-search", "model=hf", f"model.path={tiny_hf_dir}", *TINY,
                "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _results(sweep)
    assert len(trials) == 3
    lams = {t["config"]["allocation"]["lam"] for t in trials}
    assert len(lams) == 3 and all(0.02 <= lam <= 0.2 for lam in lams)  # the sampler varied what it searches
    assert all(t["config"]["allocation"]["m"] in (3, 5, 7, 10) for t in trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [t["objective"]["value"] for t in trials]
    assert best["best_value"] == pytest.approx(min(values))  # Optuna saw what the CLI returned


def test_optuna_multi_objective_gets_both_values_and_a_pareto_front(tmp_path, cache_dir, data_root, tiny_hf_dir):
    sweep = tmp_path / "pareto"
    proc = _cli("-m", "experiment=structured-pareto", "model=hf", f"model.path={tiny_hf_dir}", *TINY,
                "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _results(sweep)
    assert len(trials) == 3
    for trial in trials:
        ppl = trial["metrics"]["perplexity"]["wikitext2"]["ppl"]
        assert trial["objective"]["value"] == [ppl, trial["metrics"]["structure"]["params_after"]]
    front = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    points = [tuple(t["objective"]["value"]) for t in trials]
    dominated = {p for p in points for q in points if q != p and q[0] <= p[0] and q[1] <= p[1]}
    assert {tuple(s["values"]) for s in front} == set(points) - dominated  # the Pareto front of what ran


def test_submitit_local_runs_each_job_in_its_own_process(tmp_path, cache_dir, data_root, tiny_hf_dir):
    sweep = tmp_path / "submitit"
    proc = _cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
                "model=hf", f"model.path={tiny_hf_dir}", "method=magnitude", "sparsity=0.3,0.6", *TINY,
                f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(sweep)
    assert sorted(r["config"]["sparsity"] for r in results) == [0.3, 0.6]
    assert all(r["status"] == "complete" for r in results)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # submitit ran and returned both jobs
