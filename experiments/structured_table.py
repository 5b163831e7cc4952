"""The README's structured-pruning table (issue #11) on the default model, CPU-budget protocol.

Three steps, one list of rows (``ROWS``):

    python experiments/structured_table.py run [name ...]   # the prunelab runs, one at a time; each saves its model
    python experiments/structured_table.py latency          # prefill / decode timing of every saved model (idle machine)
    python experiments/structured_table.py table            # experiments/results/structured/table.md

``run`` calls ``python -m prunelab experiment=cpu-budget <overrides> structure.save=true`` into
``$STRUCTURED_OUT/<name>`` (default /tmp/prunelab-structured) and copies each results.json to
``experiments/results/structured/runs/<name>/`` (the saved weights stay outside the repository).
``latency`` loads each saved model the way a user would (``model=hf model.path=<run>/model``: plain
``from_pretrained`` for standard configs, prunelab's loader for per-layer widths), and the dense default
model, and times them all in one process with ``prunelab.eval.latency`` (torch.utils.benchmark): prefill
tokens/s, eager decode ms/token and, with ``--compile``, static-cache ``torch.compile`` decode. It writes
``experiments/results/structured/latency.json``. ``table`` joins both with the dense run of the pruning
table and checks the decode speed-up against the ratio of MACs per token.
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
from pathlib import Path
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("structured_table")
RESULTS = Path(__file__).resolve().parent / "results"
HERE = RESULTS / "structured"
BASE = "python -m prunelab experiment=cpu-budget"
P20 = "structure=neurons structure.fraction=0.34"  # 34% of MLP neurons = 20.1% of SmolLM2-135M's parameters

# (name, label, overrides); "dense" is the pruning table's dense run
ROWS: list[tuple[str, str, str]] = [
    ("dense", "dense", "method=dense"),
    ("neurons_0.2", "MLP neurons 20% (Wanda-sp)", "structure=neurons structure.fraction=0.2"),
    ("neurons_0.3", "MLP neurons 30% (Wanda-sp)", "structure=neurons structure.fraction=0.3"),
    ("neurons_0.5", "MLP neurons 50% (Wanda-sp)", "structure=neurons structure.fraction=0.5"),
    ("heads_per_group", "1 query head per KV group (Wanda-sp)", "structure=heads"),
    ("heads_one_group", "1 whole KV group (Wanda-sp)", "structure=heads structure.heads=groups structure.fraction=0.34"),
    ("layers_bi_2", "2 layers, Block Influence", "structure=layers structure.count=2"),
    ("layers_last_2", "2 layers, the last ones", "structure=layers structure.count=2 structure.score=last"),
    ("layers_bi_4", "4 layers, Block Influence", "structure=layers structure.count=4"),
    ("layers_last_4", "4 layers, the last ones", "structure=layers structure.count=4 structure.score=last"),
    ("layers_bi_8", "8 layers, Block Influence", "structure=layers structure.count=8"),
    ("layers_last_8", "8 layers, the last ones", "structure=layers structure.count=8 structure.score=last"),
    ("p20_magnitude", "~20% params: magnitude", f"{P20} structure.score=magnitude"),
    ("p20_wanda", "~20% params: Wanda-sp", f"{P20} structure.score=wanda"),
    ("p20_flap", "~20% params: FLAP", f"{P20} structure.score=flap"),
    ("p20_taylor", "~20% params: Taylor", f"{P20} structure.score=taylor"),
    ("p20_flap_global", "~20% params: FLAP, adaptive widths (AL-MM)", f"{P20} structure.score=flap structure.allocation=global"),
    # 27% of the heads' (q rows, o columns) and neurons' parameters = ~20% of SmolLM2-135M's parameters
    ("p20_flap_al_am", "~20% params: FLAP, heads + neurons (AL-AM)",
     "structure=heads_neurons structure.fraction=0.27 structure.score=flap structure.allocation=global"),
]
DENSE_RUN = RESULTS / "cpu-budget" / "runs" / "dense" / "results.json"


def _out() -> Path:
    return Path(os.environ.get("STRUCTURED_OUT", "/tmp/prunelab-structured"))


def _row(name: str) -> tuple[str, str, str]:
    for row in ROWS:
        if row[0] == name:
            return row
    raise SystemExit(f"unknown row {name!r}; choose from {', '.join(r[0] for r in ROWS)}")


def _results(name: str) -> Path:
    return DENSE_RUN if name == "dense" else HERE / "runs" / name / "results.json"


# ------------------------------------------------------------------------------------------------------- run
def run(names: list[str]) -> None:
    """The prunelab runs, one after the other (each saves its shrunk model into its run folder)."""
    for name in names or [r[0] for r in ROWS if r[0] != "dense"]:
        _, _, overrides = _row(name)
        if name == "dense":
            log.info("dense: the pruning table's run (%s) is used", DENSE_RUN)
            continue
        folder = _out() / name
        command = [sys.executable, "-m", "prunelab", "experiment=cpu-budget", *shlex.split(overrides),
                   "structure.save=true", f"hydra.run.dir={folder}"]
        log.info("== %s: %s", name, shlex.join(command[1:]))
        subprocess.run(command, check=True)
        keep = HERE / "runs" / name
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "results.json").write_bytes((folder / "results.json").read_bytes())


# --------------------------------------------------------------------------------------------------- latency
def _load(name: str) -> tuple[Any, Any]:
    from omegaconf import OmegaConf

    from prunelab.models.loading import load_model

    if name == "dense":
        model_cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "prunelab" / "conf" / "model" / "smollm2-135m.yaml")
        return load_model(model_cfg, "cpu", os.environ.get("PRUNELAB_CACHE", "~/.cache/prunelab"))
    folder = _out() / name / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: run `python experiments/structured_table.py run {name}` first")
    return load_model({"name": name, "source": "hf", "path": str(folder), "dtype": "float32"}, "cpu")


def latency(names: list[str], compile: bool, repeats: int, note: str) -> None:
    """Time every saved model (and the dense one) in this process; write latency.json."""
    import torch
    import transformers

    from prunelab.eval.latency import measure_latency
    from prunelab.device import device_info
    from prunelab.eval.size import flops_per_token

    cfg = SimpleNamespace(batch_size=1, prefill_lengths=[128, 512], decode_tokens=32, warmup=2, repeats=repeats,
                          compile=compile, sparse_kernels=False)
    prompt = 128
    path = HERE / "latency.json"
    out = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    out.update({"settings": {**vars(cfg), "decode_prompt": prompt}, "note": note,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "environment": {"device": device_info(torch.device("cpu")), "torch": torch.__version__,
                                "transformers": transformers.__version__, "python": platform.python_version(),
                                "cpu_count": os.cpu_count()},
                "command": "python experiments/structured_table.py " + shlex.join(sys.argv[1:])})
    for name in names or [r[0] for r in ROWS]:
        model, _ = _load(name)
        torch._dynamo.reset()
        log.info("== %s", name)
        result = measure_latency(model, cfg, "cpu", decode_prompt_len=prompt)
        context = prompt + cfg.decode_tokens // 2  # the mean context of the timed decode steps
        flops = flops_per_token(model, context)
        out["rows"][name] = {"params": sum(p.numel() for p in model.parameters()),
                             "macs_per_token": flops["total"] / 2, "macs_context": context, "latency": result}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        del model
    log.info("wrote %s", path)


# ----------------------------------------------------------------------------------------------------- table
def _units_removed(st: dict[str, Any]) -> str:
    """``9210 of 46080 neurons``; heads and neurons together: ``42 heads + 11490 neurons``."""
    if isinstance(st["removed"], dict):
        return " + ".join(f"{sum(map(len, rows))} {kind}" for kind, rows in st["removed"].items())
    return f"{st['units_before'] - st['units_after']} of {st['units_before']} {st['unit']}"


def table() -> str:
    """The README table from the runs' results.json and latency.json; also checks decode speed-up >= 0.8 x MACs."""
    timing = json.loads((HERE / "latency.json").read_text())["rows"]
    dense = timing["dense"]
    lines = ["| removed | units removed | params | params removed | MACs/token | WikiText-2 PPL | prefill tok/s (512) "
             "| decode ms/token eager | decode ms/token compiled | decode speed-up eager / compiled | MACs dense / pruned "
             "| command |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for name, label, overrides in ROWS:
        path = _results(name)
        command = f"`{BASE} {overrides}`"
        if not path.is_file() or name not in timing:
            lines.append(f"| {label} | | | | | not run yet | | | | | | {command} |")
            continue
        metrics = json.loads(path.read_text())["metrics"]
        ppl = metrics["perplexity"]["wikitext2"]["ppl"]
        st = metrics.get("structure")
        t = timing[name]
        lat = t["latency"]
        prefill = lat["prefill"]["512"]["tokens_per_s"]["median"]
        eager = lat["decode"]["ms_per_token"]["median"]
        compiled = (lat.get("decode_compiled") or {}).get("ms_per_token", {}).get("median")
        speed_eager = dense["latency"]["decode"]["ms_per_token"]["median"] / eager
        dense_compiled = (dense["latency"].get("decode_compiled") or {}).get("ms_per_token", {}).get("median")
        speed_compiled = dense_compiled / compiled if compiled and dense_compiled else None
        mac_ratio = dense["macs_per_token"] / t["macs_per_token"]
        units = _units_removed(st) if st else "–"
        removed = f"{100 * st['params_removed_fraction']:.1f}%" if st else "–"
        compiled_text = f"{compiled:.2f}" if compiled else "–"
        speed_text = f"x{speed_eager:.2f} / " + (f"x{speed_compiled:.2f}" if speed_compiled else "–")
        lines.append(f"| {label} | {units} | {t['params'] / 1e6:.1f}M | {removed} | {t['macs_per_token'] / 1e6:.1f}M | "
                     f"{ppl:.2f} | {prefill:,.0f} | {eager:.2f} | {compiled_text} | {speed_text} | x{mac_ratio:.2f} | "
                     f"{command} |")
        if st and st.get("standard_config"):  # compiled decode (less Python overhead per token) where measured
            speed = speed_compiled or speed_eager
            checks.append((label, speed, mac_ratio, speed >= 0.8 * mac_ratio))
    lines += ["", "Decode speed-up against the MAC arithmetic (uniform shapes; compiled static-cache decode, eager "
              "where none was measured):", "",
              "| removed | decode speed-up | MACs dense / pruned | 0.8 x MAC ratio | speed-up >= 0.8 x MAC ratio |",
              "|---|---|---|---|---|"]
    lines += [f"| {label} | x{speed:.2f} | x{ratio:.2f} | x{0.8 * ratio:.2f} | {'yes' if ok else 'no'} |"
              for label, speed, ratio, ok in checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("names", nargs="*")
    lat = sub.add_parser("latency")
    lat.add_argument("names", nargs="*")
    lat.add_argument("--compile", action="store_true", help="also decode with a static KV cache + torch.compile")
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--note", default="", help="how the machine was (idle or not), kept in latency.json")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.step == "run":
        run(args.names)
    elif args.step == "latency":
        latency(args.names, args.compile, args.repeats, args.note)
    else:
        text = table()
        (HERE / "table.md").write_text(text)
        log.info("%s\nwritten to %s", text, HERE / "table.md")


if __name__ == "__main__":
    main()
