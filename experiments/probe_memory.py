"""Where a streamed pruning run's memory goes: RSS sampled with the code that was running at each new peak.

A thread reads ``/proc/self/status`` every 5 ms while ``prune_streamed`` prunes a checkpoint folder
(e.g. a shape from ``shape_models.py``) in this process. Each time resident memory passes the last
peak by 20 MB it records the total, anonymous and file-backed RSS and the innermost prunelab frames
of the main thread. The timeline shows which step holds what: the Hessian factorisation, the
mapped embeddings, the heap growing layer by layer. Linux only (``/proc``). Calibration is random
token ids: memory depends on their shape, not their values. Usage::

    python experiments/probe_memory.py /tmp/prunelab-shapes/llama-7b-2l-random --method sparsegpt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("probe_memory")


def rss_gb() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in GB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024 / 1e9
    return values


def main() -> None:
    from prunelab.prune.engine import prune_streamed
    from prunelab.prune.methods import build_method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a checkpoint folder (config.json + safetensors)")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--step-gb", type=float, default=0.02, help="record a new peak this much above the last")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    main_thread = threading.get_ident()
    peaks: list[tuple[float, dict[str, float], str]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        top = 0.0
        while not stop.is_set():
            now = rss_gb()
            if now["VmRSS"] > top + args.step_gb:
                top = now["VmRSS"]
                frames = [f for f in traceback.extract_stack(sys._current_frames()[main_thread]) if "prunelab" in f.filename]
                where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
                peaks.append((time.perf_counter() - start, now, where))
            time.sleep(0.005)

    vocab = int(json.loads((args.folder / "config.json").read_text())["vocab_size"])
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    out = Path(tempfile.mkdtemp(prefix="probe-memory-"))
    sampler = threading.Thread(target=sample, daemon=True)
    log.info("at start: %s", {k: round(v, 2) for k, v in rss_gb().items()})
    sampler.start()
    try:
        prune_streamed(args.folder, out / "model", build_method(args.method, {}), ids, 0.5)
    finally:
        stop.set()
        sampler.join()
        shutil.rmtree(out)  # the probe's own temporary output
    for seconds, now, where in peaks:
        log.info("%7.1f s  RSS %.2f GB (anon %.2f, file %.2f)  %s", seconds, now["VmRSS"], now["RssAnon"], now["RssFile"], where)
    log.info("peak RSS %.2f GB (ru_maxrss)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


if __name__ == "__main__":
    if not os.path.exists("/proc/self/status"):
        sys.exit("probe_memory.py reads /proc/self/status: Linux only")
    main()
