"""The Hydra app end to end, as a person runs it: results.json, W&B offline, multirun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab.tracking.wandb_offline import read_offline_run

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cache_dir: Path, data_root: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "prunelab", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _wandb_summary(run_dir: Path) -> dict:
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, f"expected one offline W&B run in {run_dir}, found {offline}"
    run = read_offline_run(offline[0])
    assert run["config"]["method"]["name"] == json.loads((run_dir / "results.json").read_text())["config"]["method"]["name"]
    return run["summary"]


@pytest.mark.slow
def test_dense_quick_run_of_the_default_model_writes_complete_results(tmp_path, cache_dir, data_root, default_model_dir):
    run_dir = tmp_path / "dense"
    proc = run_cli("method=dense", f"hydra.run.dir={run_dir}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    ppl = results["metrics"]["perplexity"]["wikitext2"]
    assert ppl["windows"] == 8 and ppl["seqlen"] == 2048 and ppl["stream_tokens"] == 304_986
    assert 5 < ppl["ppl"] < 60, "SmolLM2-135M reads WikiText-2 at a perplexity around 20"
    assert len(ppl["window_mean_nll"]) == 8 and len(ppl["fingerprint"]) == 64
    assert results["config"]["model"]["name"] == "smollm2-135m" and results["config"]["eval"]["name"] == "quick"
    assert results["versions"]["torch"] and results["versions"]["transformers"]
    assert "sha" in results["git"] and results["device"]["type"] == "cpu"
    assert results["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the kernels' SIMD level
    assert results["device"]["torch_threads"] == torch.get_num_threads() and results["device"]["cpu_name"]
    assert {"load_s", "perplexity_s"} <= set(results["timings"])
    assert "Q4_1" in results["note"]
    summary = _wandb_summary(run_dir)
    assert summary["metrics/perplexity/wikitext2/ppl"] == pytest.approx(ppl["ppl"])
    assert not (run_dir / "failed.json").exists()


def test_multirun_gives_each_job_its_own_folder_and_wandb_run(tmp_path, cache_dir, data_root, tiny_hf_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", "model=hf", f"model.path={tiny_hf_dir}", "seed=0,1", "eval.perplexity.seqlen=64",
        "eval.perplexity.max_windows=2", f"hydra.sweep.dir={sweep}",
        cache_dir=cache_dir, data_root=data_root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    seeds = set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "complete" and results["run_dir"] == str(job)
        seeds.add(results["config"]["seed"])
        assert _wandb_summary(job)["metrics/perplexity/wikitext2/windows"] == 2
    assert seeds == {0, 1}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sparsity=2"], "sparsity=2.0 is out of range"),
        (["model=hf", "model.path=/nonexistent"], "model.path='/nonexistent' does not exist"),
        (["model.path=/nonexistent"], "is not a GGUF file"),
        (["method=wanda", "sparsity=0.6", "pattern=2:4"], "set sparsity=0.5"),
    ],
)
def test_bad_input_fails_early_with_a_message_and_no_results(tmp_path, cache_dir, data_root, args, needle):
    run_dir = tmp_path / "bad"
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", cache_dir=cache_dir, data_root=data_root, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not (run_dir / "results.json").exists()


def test_a_run_that_fails_after_starting_writes_failed_json_only(tmp_path, cache_dir, data_root, tiny_hf_dir):
    empty_model_folder = tmp_path / "weightless-model"  # config and tokenizer, but no weights
    empty_model_folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (empty_model_folder / name).write_bytes((tiny_hf_dir / name).read_bytes())
    run_dir = tmp_path / "failing"
    proc = run_cli("model=hf", f"model.path={empty_model_folder}", "logger=none", f"hydra.run.dir={run_dir}",
                   cache_dir=cache_dir, data_root=data_root, timeout=120)
    assert proc.returncode != 0
    assert not (run_dir / "results.json").exists()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "failed" and "ModelLoadError" in failed["error"]


def test_zero_shot_latency_and_size_reach_results_json(tmp_path, cache_dir, data_root, tiny_hf_dir):
    run_dir = tmp_path / "all-evals"
    proc = run_cli(
        "model=hf", f"model.path={tiny_hf_dir}", "method=magnitude", "pattern=2:4", "eval=zeroshot-quick",
        "eval.zeroshot.limit=2", "eval.zeroshot.tasks=[arc_easy,lambada_openai]", "eval.zeroshot.bootstrap_iters=0",
        "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=1", "eval.latency.enabled=true",
        "eval.latency.prefill_lengths=[16]", "eval.latency.decode_tokens=4", "eval.latency.repeats=2",
        "eval.latency.warmup=1", "logger=none", f"hydra.run.dir={run_dir}",
        cache_dir=cache_dir, data_root=data_root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert set(metrics["zeroshot"]["tasks"]) == {"arc_easy", "lambada_openai"}
    assert all(0.0 <= task["acc"] <= 1.0 for task in metrics["zeroshot"]["tasks"].values())
    assert metrics["sparsity"]["nm_ok"] and metrics["sparsity"]["overall"] == pytest.approx(0.5)
    assert metrics["size"]["params"]["prunable"]["sparsity"] == pytest.approx(0.5)
    assert metrics["latency"]["prefill"] and metrics["latency"]["decode"]
