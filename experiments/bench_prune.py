"""Pruning cost benchmark: each method's time as a multiple of one dense layer-by-layer forward.

The reference is ``prunelab.prune.engine.layerwise_forward``: the same capture and the same
one-layer-at-a-time replay the engine does, over the same calibration windows, batch size and
device, without hooks or pruning. Every measurement runs in its own Python process (a worker),
so peak RSS is that job's own; CUDA peaks come from ``torch.cuda.max_memory_allocated``. The
dense reference runs first and last; the ratio divides by the mean of the two.

Examples::

    # default model (SmolLM2-135M) on the CPU, small calibration set
    nice -n 10 python experiments/bench_prune.py --nsamples 4 --seqlen 512
    # LLaMA-7B shapes, random fp16 weights, layers on the GPU one at a time (the rest wait on the CPU)
    python experiments/bench_prune.py --shape llama-7b
    # smoke test of the 7B path: two 7B-shaped layers on the CPU in float32
    python experiments/bench_prune.py --shape llama-7b --layers 2 --device cpu --dtype float32 --nsamples 2 --seqlen 128

Writes ``experiments/results/bench_prune_<shape>_<device>_<nsamples>x<seqlen>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_prune")

# LLaMA-7B (Touvron et al. 2023): d=4096, MLP 11008, 32 layers, 32 heads, vocab 32000
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
DEFAULT_JOBS = ["magnitude", "wanda", "sparsegpt", "magnitude@2:4", "wanda@2:4", "sparsegpt@2:4"]
TARGETS = {"wanda": 2.0, "sparsegpt": 17.0}  # the ceilings, as multiples of the dense reference


# ------------------------------------------------------------------------------------------------ worker
def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The model (on the CPU or the offload device) and the calibration windows."""
    if args.shape == "default":
        from omegaconf import OmegaConf

        from prunelab.data.calibration import get_calibration
        from prunelab.models.loading import load_model

        model_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "prunelab" / "conf" / "model" / "smollm2-135m.yaml"))
        if args.dtype:
            model_cfg["dtype"] = args.dtype
        model, tokenizer = load_model(model_cfg, "cpu", args.cache_dir)
        calib_cfg = {"source": args.calib_source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
        ids, record = get_calibration(tokenizer, calib_cfg, args.data_root, args.cache_dir)
        return model, ids, {"model": "smollm2-135m", "note": model_cfg.get("note"), "calibration": record}

    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(LLAMA_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, args.seqlen), tie_word_embeddings=False)
    dtype = getattr(torch, args.dtype or "float16")
    build_on = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    with torch.device(build_on):  # random init is fast on the GPU; the layers then wait on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to("cpu").eval().requires_grad_(False)
    log.info("built llama-7b shape (%d layers, %s) in %.1f s", shape["num_hidden_layers"], dtype, time.perf_counter() - start)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.nsamples, args.seqlen), generator=generator)
    return model, ids, {"model": f"llama-7b shape, random weights ({shape['num_hidden_layers']} layers)"}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    from prunelab.models.loading import resolve_device
    from prunelab.prune.engine import layerwise_forward, prune_model
    from prunelab.prune.methods import build_method

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, ids, info = _load(args)
    device = resolve_device(args.device)
    engine = {"device": str(device), "batch_size": args.batch_size, "sequential": not args.no_sequential}
    layerwise_forward(model, ids[:1, : min(32, ids.shape[1])], engine)  # warm-up: thread pools, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    job = args.job
    row: dict[str, Any] = {"job": job, **info}
    if job == "dense":
        start = time.perf_counter()
        layerwise_forward(model, ids, engine)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["total_s"] = time.perf_counter() - start
        row["layer_forwards"] = 1
    else:
        name, _, pattern = job.partition("@")
        pattern = pattern or "unstructured"
        report = prune_model(model, build_method(name), ids, 0.5, pattern, {"name": "uniform"}, engine)
        row.update(
            method=name, pattern=pattern, total_s=report.timings["total"], timings=report.timings,
            layer_forwards=report.layer_forwards, sparsity=report.summary.overall, nm_ok=report.summary.nm_ok,
        )
    import resource

    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    row["nsamples"], row["seqlen"] = int(ids.shape[0]), int(ids.shape[1])
    return row


# ------------------------------------------------------------------------------------------------ driver
def _spawn(args: argparse.Namespace, job: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    argv = [sys.executable, __file__, "--worker", job, "--worker-out", out] + _passthrough(args)
    log.info("running %s", job)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    subprocess.run(argv, check=True, cwd=REPO, env=env)
    row = json.loads(Path(out).read_text())
    os.unlink(out)
    log.info("%s: %.2f s, peak RSS %.0f MB", job, row["total_s"], row["peak_rss_mb"])
    return row


def _passthrough(args: argparse.Namespace) -> list[str]:
    keep = ["shape", "device", "dtype", "nsamples", "seqlen", "batch_size", "layers", "threads", "calib_source", "cache_dir", "data_root"]
    argv = []
    for key in keep:
        value = getattr(args, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if args.no_sequential:
        argv.append("--no-sequential")
    return argv


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    dense = result["dense_reference_s"]
    lines = [
        f"# Pruning cost: {result['model']}",
        "",
        f"{result['nsamples']} calibration windows × {result['seqlen']} tokens, batch {result['batch_size']}, "
        f"device {result['device']}, sequential={result['sequential']}. {env['when']}, torch {env['torch']}, "
        f"{env['cpu_threads']} CPU threads{', ' + env['gpu'] if env.get('gpu') else ''}, git {str(env['git'])[:10]}.",
        "",
        f"Dense reference (capture + one layer-by-layer forward): {dense['mean']:.2f} s "
        f"(runs: {', '.join(f'{t:.2f}' for t in dense['runs'])}).",
        "",
        "| method | pattern | total s | × dense | target | capture | stats pass | solve | refresh pass | layer passes | sparsity | peak RSS MB | peak CUDA MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        t = row["timings"]
        target = TARGETS.get(row["method"])
        lines.append(
            f"| {row['method']} | {row['pattern']} | {row['total_s']:.2f} | {row['ratio']:.2f} | "
            f"{'≤ %.1f' % target if target else ''} | {t.get('capture', 0):.2f} | {t.get('stats', 0):.2f} | "
            f"{t.get('solve', 0):.2f} | {t.get('forward', 0):.2f} | {row['layer_forwards']} | {row['sparsity']:.4f} | "
            f"{row['peak_rss_mb']:.0f} | {'%.0f' % row['peak_cuda_mb'] if 'peak_cuda_mb' in row else '–'} |"
        )
    lines += [
        "",
        "stats pass: layer forwards with input-statistics hooks (in sequential mode the last Linear of each layer only "
        "records its input); refresh pass: the pruned layer re-run to feed the next layer; layer passes: decoder-layer "
        "passes over the whole calibration set. Peak RSS is each job's own process, model load included.",
    ]
    if result.get("note"):
        lines += ["", f"Model note: {result['note']}"]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["default", "llama-7b"], default="default",
                        help="default: the SmolLM2-135M model; llama-7b: LLaMA-7B shapes with random weights")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cpu for default, auto for llama-7b)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the model config's; fp16 for llama-7b)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 4; 128 for llama-7b)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512; 2048 for llama-7b)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per layer forward")
    parser.add_argument("--layers", type=int, default=None, help="llama-7b only: keep this many decoder layers (smoke tests)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per worker (torch and OpenMP); 1 avoids spin-wait stalls on a shared, loaded CPU")
    parser.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma list of method[@N:M]")
    parser.add_argument("--no-sequential", action="store_true", help="propagate dense outputs (prune.sequential=false)")
    parser.add_argument("--calib-source", default="c4")
    parser.add_argument("--cache-dir", default=os.environ.get("PRUNELAB_CACHE", "~/.cache/prunelab"))
    parser.add_argument("--data-root", default=os.environ.get("PRUNELAB_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--worker", dest="job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seven_b = args.shape == "llama-7b"
    args.device = args.device or ("auto" if seven_b else "cpu")
    args.nsamples = args.nsamples or (128 if seven_b else 4)
    args.seqlen = args.seqlen or (2048 if seven_b else 512)

    if args.job is not None:
        Path(args.worker_out).write_text(json.dumps(worker(args), default=str))
        return 0

    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    dense_runs = [_spawn(args, "dense")]
    rows = [_spawn(args, job) for job in jobs]
    dense_runs.append(_spawn(args, "dense"))
    dense_mean = sum(r["total_s"] for r in dense_runs) / len(dense_runs)
    for row in rows:
        row["ratio"] = row["total_s"] / dense_mean
    from prunelab.models.loading import resolve_device

    device = resolve_device(args.device)
    env = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": args.threads or torch.get_num_threads(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "git": _git_sha(),
    }
    result = {
        "model": dense_runs[0]["model"], "note": dense_runs[0].get("note"), "shape": args.shape, "device": str(device),
        "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size, "sequential": not args.no_sequential,
        "dense_reference_s": {"runs": [r["total_s"] for r in dense_runs], "mean": dense_mean},
        "dense_runs": dense_runs, "rows": rows, "targets": TARGETS, "environment": env,
        "calibration": dense_runs[0].get("calibration"),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = f"_{args.layers}layers" if args.layers else ""
    stem = f"bench_prune_{args.shape}{layers}_{device.type}_{args.nsamples}x{args.seqlen}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    markdown = to_markdown(result)
    (out / f"{stem}.md").write_text(markdown)
    log.info("wrote %s.{md,json}\n%s", out / stem, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
