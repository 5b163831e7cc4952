"""A result that is not a number is a failed run, never a complete one (issue #21, item 3)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from prunelab.tracking.objective import MetricError, check_numbers
from test_run_safety import REPO, cli_env


def _cfg(datasets=("wikitext2",), enabled=True, optimized_metric=None):
    return OmegaConf.create({"optimized_metric": optimized_metric,
                             "eval": {"perplexity": {"enabled": enabled, "datasets": list(datasets)}}})


def _ppl(value):
    return {"ppl": value, "mean_nll": math.log(value) if value > 0 else value, "predicted_tokens": 0}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_perplexity_that_is_not_finite_is_refused(value):
    with pytest.raises(MetricError, match="perplexity.wikitext2.ppl is (nan|inf)"):
        check_numbers({"perplexity": {"wikitext2": _ppl(value)}}, _cfg())


def test_every_asked_dataset_and_objective_must_be_there():
    with pytest.raises(MetricError, match="perplexity.c4.ppl was asked for"):
        check_numbers({"perplexity": {"wikitext2": _ppl(20.0)}}, _cfg(("wikitext2", "c4")))
    with pytest.raises(MetricError, match="zeroshot.mean_acc was asked for"):
        check_numbers({"perplexity": {"wikitext2": _ppl(20.0)}}, _cfg(optimized_metric="zeroshot.mean_acc"))
    check_numbers({"perplexity": {"wikitext2": _ppl(20.0), "c4": _ppl(30.0)}}, _cfg(("wikitext2", "c4")))
    check_numbers({}, _cfg(enabled=False))  # nothing asked, nothing to check


def test_a_run_whose_perplexity_is_nan_writes_failed_json_not_results(tmp_path, cache_dir, data_root, tiny_hf_dir):
    """The CLI with a model that predicts NaN: exit 2, one line, failed.json (with the metrics), no results.json."""
    run_dir = tmp_path / "run"
    script = f"""
import sys
from prunelab.eval import perplexity as ppl
ppl._window_nll = lambda logits, batch: [float("nan")] * batch.shape[0]
sys.argv = ["prunelab", "model=hf", "model.path={tiny_hf_dir}", "eval.perplexity.seqlen=32",
            "eval.perplexity.max_windows=2", "logger=none", "hydra.run.dir={run_dir}"]
from prunelab.cli import entry
entry()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(cache_dir, data_root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not (run_dir / "results.json").exists()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["phase"] == "record" and "is nan" in failed["error"]
    assert math.isnan(failed["metrics"]["perplexity"]["wikitext2"]["ppl"])
    assert "Traceback" not in proc.stderr
