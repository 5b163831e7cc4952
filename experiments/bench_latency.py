"""Latency benchmark: dense vs 2:4 (semi-structured sparse kernels) on a model with random weights.

Default: LLaMA-7B shapes in fp16 on CUDA, prefill at 128..8192 tokens, compiled static-cache decode, and a
per-matmul table for the 7B Linear shapes (where the cuSPARSELt crossover shows). Variants, all on one
model (weights pruned in place between them):

* ``dense``           the random model;
* ``2:4 dense-kern``  the same weights with a 2:4 magnitude mask, dense kernels (control: zeros alone
                      change nothing);
* ``2:4 sparse-kern`` the same 2:4 weights swapped to ``torch.sparse.to_sparse_semi_structured``.

Examples::

    python experiments/bench_latency.py                        # LLaMA-7B shapes, CUDA, fp16
    python experiments/bench_latency.py --shape small --device cpu --dtype float32   # smoke test on CPU

Writes ``experiments/results/bench_latency_<shape>_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from prunelab.eval.latency import follows_two_four, measure_latency, summarize, time_calls
from prunelab.eval.size import count_parameters, prunable_linears
from prunelab.models.loading import ModelLoadError, resolve_device
from prunelab.prune.masks import nm_mask
from prunelab.prune.pattern import Pattern
from prunelab.device import device_info

log = logging.getLogger("bench_latency")

SHAPES: dict[str, dict[str, Any]] = {
    # LLaMA-7B (Touvron et al. 2023): d=4096, MLP 11008, 32 layers, 32 heads (no GQA), vocab 32000
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    # the project's default model (SmolLM2-135M): d=576, MLP 1536, 30 layers, 9 q / 3 kv heads
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    # smoke-test shape: seconds on a CPU, every Linear a multiple of 64 (valid for the sparse kernels too)
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024),
}
DEFAULT_LENGTHS = {"llama-7b": [128, 256, 512, 1024, 2048, 4096, 8192], "smollm2-135m": [128, 512, 2048, 8192],
                   "small": [32, 128]}
DEFAULT_DECODE_TOKENS = {"llama-7b": 64, "smollm2-135m": 64, "small": 8}
VARIANTS = ("dense", "2:4 dense-kern", "2:4 sparse-kern")


# ------------------------------------------------------------------------------------------------ model
def build_model(shape: str, dtype: torch.dtype, device: torch.device, max_len: int) -> nn.Module:
    """A Llama-architecture model with random weights, created directly on ``device`` in ``dtype``."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_len, tie_word_embeddings=False)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    log.info("built %s (%.2fB parameters, %s, %s) in %.1f s", shape, count_parameters(model)["total"] / 1e9,
             dtype, device, time.perf_counter() - start)
    return model


@torch.no_grad()
def apply_two_four(model: nn.Module) -> int:
    """Keep the 2 largest |w| of every 4 consecutive inputs in each decoder Linear; return matrices pruned."""
    pattern = Pattern.parse("2:4")
    linears = prunable_linears(model)
    for module in tqdm(linears.values(), desc="2:4 mask", leave=False):
        module.weight.mul_(nm_mask(module.weight.abs().float(), pattern))
        assert follows_two_four(module.weight)
    return len(linears)


# ---------------------------------------------------------------------------------------------- matmuls
def linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` of the distinct Linear shapes of a decoder layer."""
    s = SHAPES[shape]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    shapes = {"q_proj/o_proj": (s["hidden_size"], s["hidden_size"]),
              "gate_proj/up_proj": (s["hidden_size"], s["intermediate_size"]),
              "down_proj": (s["intermediate_size"], s["hidden_size"])}
    if kv != s["hidden_size"]:
        shapes["k_proj/v_proj"] = (s["hidden_size"], kv)
    return shapes


@torch.no_grad()
def bench_matmuls(shape: str, tokens: list[int], dtype: torch.dtype, device: torch.device,
                  repeats: int) -> list[dict[str, Any]]:
    """Per Linear shape and token count: ms per F.linear, dense weight vs its 2:4 semi-structured copy."""
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (fan_in, fan_out) in tqdm(linear_shapes(shape).items(), desc="matmuls", leave=False):
        weight = torch.randn(fan_out, fan_in, generator=gen, device=device, dtype=dtype)
        weight = weight * nm_mask(weight.abs().float(), Pattern.parse("2:4"))
        sparse = torch.sparse.to_sparse_semi_structured(weight)
        for n in tokens:
            x = torch.randn(n, fan_in, generator=gen, device=device, dtype=dtype)
            entry: dict[str, Any] = {"linear": name, "in": fan_in, "out": fan_out, "tokens": n}
            for label, w in (("dense", weight), ("sparse", sparse)):
                measurement = time_calls(lambda: nn.functional.linear(x, w), warmup=3, repeats=repeats,
                                         label=name, description=f"{label}, {n} tokens")
                entry[f"{label}_ms"] = summarize(measurement, scale=1000.0)
            entry["speedup"] = entry["dense_ms"]["median"] / entry["sparse_ms"]["median"]
            rows.append(entry)
            log.info("%s %dx%d, %d tokens: dense %.3f ms, 2:4 %.3f ms (x%.2f)", name, fan_out, fan_in, n,
                     entry["dense_ms"]["median"], entry["sparse_ms"]["median"], entry["speedup"])
    return rows


# ----------------------------------------------------------------------------------------------- report
def _fmt_range(stats: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{stats['median'] * scale:.{digits}f} (IQR {stats['iqr'] * scale:.{digits}f})"


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    variants = [v for v in result["variants"] if "latency" in result["variants"][v]]
    lines = [
        f"# Latency: {result['shape']} shapes, random weights, {env['dtype']} on {env['device']['name']}",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"CUDA {env['device'].get('cuda')}, cuSPARSELt {env['device'].get('cusparselt')}",
        f"- {result['params'] / 1e9:.3f}B parameters; 2:4 = magnitude mask on every decoder Linear "
        f"({result['pruned_linears']} matrices); embeddings and lm_head dense",
        f"- batch {result['settings']['batch_size']}, warmup {result['settings']['warmup']}, "
        f"~{result['settings']['repeats']} timed runs (torch.utils.benchmark blocked_autorange); cells: median (IQR or min–max)",
        "",
        "## Prefill throughput (tokens/s; one forward, last-position logits)",
        "",
        "| tokens | " + " | ".join(variants) + " | " + " | ".join(f"{v} / {variants[0]}" for v in variants[1:]) + " |",
        "|---:|" + "---:|" * (2 * len(variants) - 1),
    ]
    for length in result["settings"]["prefill_lengths"]:
        cells, medians = [], []
        for v in variants:
            entry = result["variants"][v]["latency"]["prefill"][str(length)]
            seconds = entry["seconds"]
            tokens = entry["tokens"]
            cells.append(f"{tokens / seconds['median']:,.0f} ({tokens / seconds['max']:,.0f}–{tokens / seconds['min']:,.0f})")
            medians.append(tokens / seconds["median"])
        ratios = [f"x{m / medians[0]:.2f}" for m in medians[1:]]
        lines.append(f"| {length} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "## Decode (ms per generated token, greedy)", "",
              f"| variant | mode | prompt | new tokens | ms/token | {variants[0]} / variant |", "|:---|:---|---:|---:|---:|---:|"]
    first_ms: dict[str, float] = {}
    for v in variants:
        latency = result["variants"][v]["latency"]
        for decode in (latency["decode"], latency.get("decode_compiled")):
            if decode is None:
                continue
            ms = decode["ms_per_token"]["median"]
            first_ms.setdefault(decode["mode"], ms)
            lines.append(f"| {v} | {decode['mode']} | {decode['prompt_len']} | {decode['new_tokens']} | "
                         f"{_fmt_range(decode['ms_per_token'])} | x{first_ms[decode['mode']] / ms:.2f} |")
    lines += ["", "## Kernels actually used", "", "| variant | kernels | swapped | reason / notes |", "|:---|:---|---:|:---|"]
    for v, info in result["variants"].items():
        if "latency" not in info:
            lines.append(f"| {v} | – | – | FAILED: {info.get('error')} |")
            continue
        k = info["latency"]["kernels"]
        notes = "; ".join(info["latency"]["notes"])
        swapped = f"{k['swapped']}/{k['linears']}" if k["requested"] else "–"
        backend = f" ({k['backend']}, check max|err| {k.get('check_max_abs_err'):.2g})" if k.get("backend") else ""
        lines.append(f"| {v} | {k['used']}{backend} | {swapped} | {notes or '–'} |")
    if result.get("matmuls"):
        lines += ["", "## One Linear (ms per F.linear, 2:4 weight dense vs semi-structured)", "",
                  "| linear (out×in) | tokens | dense ms | 2:4 sparse ms | speedup |", "|:---|---:|---:|---:|---:|"]
        for row in result["matmuls"]:
            lines.append(f"| {row['linear']} ({row['out']}×{row['in']}) | {row['tokens']} | "
                         f"{_fmt_range(row['dense_ms'], digits=3)} | {_fmt_range(row['sparse_ms'], digits=3)} | "
                         f"x{row['speedup']:.2f} |")
    elif result.get("matmuls_skipped"):
        lines += ["", f"_Per-matmul table skipped: {result['matmuls_skipped']}_"]
    lines += ["", "Random weights: latency does not depend on weight or token values. Timings from one process; "
              "compare variants within this file, not across machines."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main
def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _resolve_device(name: str) -> torch.device:
    """The CLI's own device rule (``auto`` → CUDA when available), with a bare ``cuda`` made explicit."""
    try:
        device = resolve_device(name)
    except ModelLoadError as err:
        raise SystemExit(f"--device {name}: {err} (on CPU: --device cpu --shape small)") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run_variant(model: nn.Module, cfg: SimpleNamespace, device: torch.device, prompt_len: int) -> dict[str, Any]:
    """Measure one variant (a compiler failure is a note inside the result); other failures are recorded."""
    torch._dynamo.reset()  # each variant compiles afresh
    try:
        return {"latency": measure_latency(model, cfg, device, decode_prompt_len=prompt_len)}
    except Exception as err:  # noqa: BLE001 - a benchmark keeps going and writes the failure down
        log.exception("variant failed")
        return {"error": f"{type(err).__name__}: {err}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--lengths", type=_parse_ints, default=None, help="prefill lengths, comma separated")
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--decode-prompt", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager decode only (no static-cache compiled decode)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--no-matmuls", action="store_true", help="skip the per-Linear table (CUDA only anyway)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = _resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants {unknown or args.variants!r}: choose from {', '.join(VARIANTS)}")
    lengths = args.lengths or DEFAULT_LENGTHS[args.shape]
    decode_tokens = args.decode_tokens or DEFAULT_DECODE_TOKENS[args.shape]
    cfg = SimpleNamespace(batch_size=args.batch_size, prefill_lengths=lengths, decode_tokens=decode_tokens,
                          warmup=args.warmup, repeats=args.repeats, compile=not args.no_compile, sparse_kernels=False)
    max_len = max(max(lengths), args.decode_prompt + decode_tokens)
    model = build_model(args.shape, dtype, device, max_len)

    result: dict[str, Any] = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"device": device_info(device), "dtype": str(dtype).removeprefix("torch."),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
        "params": count_parameters(model)["total"],
        "settings": {**vars(cfg), "decode_prompt": args.decode_prompt},
        "pruned_linears": 0,
        "variants": {},
    }
    pruned = False
    for variant in variants:
        if variant != "dense" and not pruned:
            result["pruned_linears"] = apply_two_four(model)
            pruned = True
        elif variant == "dense" and pruned:
            parser.error("list 'dense' first in --variants: the 2:4 mask is applied in place")
        cfg.sparse_kernels = variant == "2:4 sparse-kern"
        log.info("=== %s ===", variant)
        result["variants"][variant] = run_variant(model, cfg, device, args.decode_prompt)

    if args.no_matmuls:
        result["matmuls_skipped"] = "--no-matmuls"
    elif device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        result["matmuls_skipped"] = f"semi-structured kernels need CUDA and fp16/bf16 (here {device.type}, {dtype})"
    else:
        del model
        torch.cuda.empty_cache()
        try:
            result["matmuls"] = bench_matmuls(args.shape, lengths, dtype, device, args.repeats)
        except Exception as err:  # noqa: BLE001
            log.exception("matmul benchmark failed")
            result["matmuls_skipped"] = f"failed: {type(err).__name__}: {err}"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_latency_{args.shape}_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    markdown = to_markdown(result)
    (out / f"{stem}.md").write_text(markdown)
    log.info("wrote %s.{json,md} in %s\n%s", stem, out, markdown)
    failed = [v for v, info in result["variants"].items() if "error" in info]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
