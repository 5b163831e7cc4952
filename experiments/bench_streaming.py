"""Streaming pruning benchmark: time and peak memory of pruning a model bigger than memory from disk.

Each job is one real run, in its own process, of::

    python -m prunelab model=hf model.path=<shape folder> model.stream=true method=<m> eval=none \\
        calib.nsamples=<n> calib.seqlen=<L> prune.device=cpu logger=none

on a LLaMA-shaped checkpoint with random weights (``shape_models.py``: 135M, 1B and 7B shapes; the
7B one is 27.5 GB in float32, more than this machine's memory). The run reads each decoder layer
memory-mapped from the safetensors, prunes it, writes it as one output shard and drops it. Peak
RSS is the run's own (``ru_maxrss``, in its results.json); the bound the issue sets is one layer's
weights + the calibration activations (inputs and outputs of a layer) + 2 GiB. After each job the
script reads two pruned tensors back from the output shards and checks their zero fraction on its
own, then deletes the output (it lives in the benchmark's run folder) to keep the disk free.

Rows accumulate in ``experiments/results/streaming/bench_streaming.json`` (keyed by shape, method,
calibration size) and the table ``bench_streaming.md`` is rewritten after every job. Examples::

    python experiments/bench_streaming.py --shapes 135m 1b --methods wanda sparsegpt
    python experiments/bench_streaming.py --shapes 1b --methods wanda --nsamples 16
    python experiments/bench_streaming.py --shapes 7b --methods wanda sparsegpt   # ~27.5 GB written once
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shape_models import SHAPES, write_shape  # noqa: E402

log = logging.getLogger("bench_streaming")
OUT = REPO / "experiments" / "results" / "streaming"
GIB = 2**30


def shape_bytes(folder: Path) -> dict[str, int]:
    """Bytes of one decoder layer and of the whole checkpoint, from its config (float32)."""
    config = json.loads((folder / "config.json").read_text())
    h, m, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    head_dim = h // heads
    layer = 4 * (h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * m + 2 * h)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return {"layer": layer, "model": int(index["metadata"]["total_size"]), "hidden": h, "layers": config["num_hidden_layers"]}


def check_output(model_dir: Path, target: float) -> dict[str, float]:
    """Zero fractions of two pruned tensors read straight from the output shards (not from the run's report)."""
    from prunelab.io.shards import ShardReader

    reader = ShardReader(model_dir)
    names = [n for n in reader.names() if n.endswith("self_attn.q_proj.weight") or n.endswith("mlp.down_proj.weight")]
    picked = [names[0], names[-1]]
    fractions = {}
    for name, tensor in reader.read(picked).items():
        fractions[name] = float((tensor == 0).sum()) / tensor.numel()
        if abs(fractions[name] - target) > 0.01:
            raise RuntimeError(f"{name}: {fractions[name]:.4f} zeros in the written shard, expected {target}")
    return fractions


def run_job(folder: Path, shape: str, method: str, nsamples: int, seqlen: int, sparsity: float, runs: Path,
            threads: int | None) -> dict[str, Any]:
    run_dir = runs / f"{shape}-{method}-{nsamples}x{seqlen}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an earlier attempt, inside the benchmark's run folder
    command = [sys.executable, "-m", "prunelab", "model=hf", f"model.path={folder}", f"model.name=llama-{shape}-random",
               "model.stream=true", "model.dtype=float32", f"method={method}", f"sparsity={sparsity}", "eval=none",
               f"calib.nsamples={nsamples}", f"calib.seqlen={seqlen}", "prune.device=cpu", "device=cpu", "logger=none",
               f"hydra.run.dir={run_dir}"]
    log.info("== %s", " ".join(command))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    pruning = results["metrics"]["pruning"]
    sizes = shape_bytes(folder)
    activations = 2 * nsamples * seqlen * sizes["hidden"] * 4
    bound = sizes["layer"] + activations + 2 * GIB
    peak = pruning["peak_memory_mb"]["cpu_peak_rss_mb"] * 2**20
    checked = check_output(run_dir / "model", sparsity)
    shutil.rmtree(run_dir / "model")  # the pruned copy: as big as the input
    timings = {k: round(v, 1) for k, v in pruning["timings"].items()}
    return {
        "shape": shape, "method": method, "nsamples": nsamples, "seqlen": seqlen, "sparsity": sparsity,
        "layers": sizes["layers"], "model_gb": sizes["model"] / 1e9, "layer_gb": sizes["layer"] / 1e9,
        "activations_gb": activations / 1e9, "peak_rss_gb": peak / 1e9, "bound_gb": bound / 1e9,
        "within_bound": peak <= bound, "wall_s": round(wall, 1), "prune_s": timings.get("total"),
        "timings_s": timings, "achieved": results["metrics"]["sparsity"]["overall"],
        "checked_zero_fractions": checked, "streamed": pruning["streamed"],
        "run_timings_s": {k: round(v, 1) for k, v in results["timings"].items()},
        "command": " ".join(command[1:]), "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": results.get("git"),  # the commit the run pruned with (and whether the checkout was dirty)
    }


def _commit(row: dict[str, Any]) -> str:
    git = row.get("git") or {}
    return f"`{git['sha'][:7]}`{' (dirty)' if git.get('dirty') else ''}" if git.get("sha") else "–"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| shape | model (fp32) | method | calibration | prune time | of which: read+write / stats / solve / re-run "
            "| peak RSS | bound (layer + activations + 2 GiB) | commit |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in sorted(rows, key=lambda r: (r["model_gb"], r["method"], r["nsamples"] * r["seqlen"])):
        t = r["timings_s"]
        parts = " / ".join(f"{t.get(k, 0):.0f}" for k in ("stream", "stats", "solve", "forward"))
        lines.append(f"| {r['shape']} | {r['model_gb']:.1f} GB | {r['method']} | {r['nsamples']} x {r['seqlen']} | "
                     f"{r['prune_s'] / 60:.1f} min | {parts} s | {r['peak_rss_gb']:.2f} GB | {r['bound_gb']:.2f} GB "
                     f"({'within' if r['within_bound'] else 'OVER'}) | {_commit(r)} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["135m", "1b"])
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--root", type=Path, default=Path("/tmp/prunelab-shapes"), help="where the shape checkpoints and runs live")
    parser.add_argument("--cache-dir", default=os.environ.get("PRUNELAB_CACHE", str(Path.home() / ".cache" / "prunelab")))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: torch's)")
    parser.add_argument("--note", default="", help="what else ran on the machine, recorded with the rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    store = OUT / "bench_streaming.json"
    data = json.loads(store.read_text()) if store.is_file() else {"rows": {}}
    for shape in args.shapes:
        folder = write_shape(shape, args.root, args.cache_dir)
        for method in args.methods:
            row = run_job(folder, shape, method, args.nsamples, args.seqlen, args.sparsity, args.root / "runs", args.threads)
            row.update(note=args.note, host={"cpus": os.cpu_count(), "machine": platform.machine(),
                                             "threads": args.threads or "torch default"})
            data["rows"][f"{shape}/{method}/{args.nsamples}x{args.seqlen}"] = row
            store.write_text(json.dumps(data, indent=2))
            (OUT / "bench_streaming.md").write_text(table(list(data["rows"].values())))
            log.info("%s %s: %.1f min, peak RSS %.2f GB (bound %.2f GB)", shape, method, row["prune_s"] / 60,
                     row["peak_rss_gb"], row["bound_gb"])


if __name__ == "__main__":
    main()
