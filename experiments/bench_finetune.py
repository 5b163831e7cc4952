"""Fine-tuning throughput of the default model on this machine: with keep-masks, without, and the plain forward.

The masked run holds a 50% magnitude mask on every Linear of the decoder layers (gradient hooks plus the
mask re-applied after each step, ``prunelab.train.masks.MaskGuard``); the unmasked run is the same loop,
the same windows and the same budget without them. The forward reference scores the same windows under
``torch.inference_mode``. Modes alternate (masked, plain, masked, plain, ...) so drift in the machine's
speed hits both alike; each mode's tokens/s is the median over its rounds, warm-up steps excluded.

Example::

    python experiments/bench_finetune.py --seqlen 512 --grad-accum 2 --steps 6 --rounds 3 --threads 2

Writes ``experiments/results/bench_finetune_cpu_<seqlen>x<grad_accum>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_finetune")


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-matrix 50% magnitude keep-masks for the decoder layers' Linear weights, applied to the model."""
    from prunelab.io.masks import apply_masks, masks_from_model

    params = dict(model.named_parameters())
    masks = {}
    for name in masks_from_model(model):  # the decoder layers' Linear weights
        weight = params[name].detach().abs()
        threshold = weight.flatten().kthvalue(int(weight.numel() * sparsity)).values
        masks[name] = (weight > threshold).cpu()
    apply_masks(model, masks)
    return masks


def run_round(model: torch.nn.Module, windows: torch.Tensor, cfg: dict[str, Any], masks: dict | None, warmup: int) -> float:
    """Tokens/s of one training run, the first ``warmup`` steps excluded."""
    from prunelab.train.loop import train

    result = train(model, windows, cfg, masks=masks)
    timed = result["history"][warmup:]
    first = result["history"][warmup - 1] if warmup else {"tokens": 0}
    # history holds cumulative tokens and tokens/s since the start: recover the timed steps' duration
    end_seconds = timed[-1]["tokens"] / timed[-1]["tokens_per_s"]
    start_seconds = first["tokens"] / first["tokens_per_s"] if warmup else 0.0
    return (timed[-1]["tokens"] - first["tokens"]) / (end_seconds - start_seconds)


@torch.inference_mode()
def forward_tokens_per_s(model: torch.nn.Module, windows: torch.Tensor) -> float:
    model(input_ids=windows[:1])  # warm-up
    start = time.perf_counter()
    for row in windows:
        model(input_ids=row[None], use_cache=False)
    return windows.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per round")
    parser.add_argument("--grad-accum", type=int, default=2,
                        help="windows per optimizer step (prunelab/conf/finetune/masked.yaml: 2 x 512 tokens)")
    parser.add_argument("--warmup", type=int, default=1, help="steps per round left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf

    from prunelab.data.sources import c4_calibration
    from prunelab.models.loading import load_model
    from prunelab.train.data import pack_windows

    model_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "prunelab" / "conf" / "model" / "smollm2-135m.yaml"))
    cache_dir = os.environ.get("PRUNELAB_CACHE", str(Path.home() / ".cache" / "prunelab"))
    model, tokenizer = load_model(model_cfg, "cpu", cache_dir)
    masks = magnitude_masks(model, 0.5)
    windows = pack_windows(c4_calibration(os.environ.get("PRUNELAB_DATA")).documents, tokenizer, args.seqlen,
                           args.steps * args.grad_accum, seed=0)
    cfg = dict(seqlen=args.seqlen, micro_batch=1, grad_accum=args.grad_accum, max_steps=args.steps, max_tokens=None, lr=1e-5,
               weight_decay=0.0, warmup_steps=0, scheduler="constant", max_grad_norm=1.0, bf16=False,
               gradient_checkpointing=False, seed=0, eval_every=None)
    rates: dict[str, list[float]] = {"masked": [], "plain": []}
    for round_index in range(args.rounds):
        for mode in ("masked", "plain"):
            rate = run_round(model, windows, cfg, masks if mode == "masked" else None, args.warmup)
            rates[mode].append(rate)
            log.info("round %d %s: %.1f tokens/s", round_index + 1, mode, rate)
    forward = forward_tokens_per_s(model, windows)
    masked, plain = statistics.median(rates["masked"]), statistics.median(rates["plain"])
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": "smollm2-135m (Q4_1 GGUF dequantized to fp32)",
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seqlen": args.seqlen, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "micro_batch": 1, "grad_accum": args.grad_accum, "optimizer": "AdamW",
        "masked_weights": sum(int((~m).sum()) for m in masks.values()),
        "tokens_per_s": {"masked_finetune": masked, "plain_finetune": plain, "forward": forward},
        "rounds_tokens_per_s": rates, "masked_over_plain": masked / plain, "note": args.note,
    }
    out = REPO / "experiments" / "results" / f"bench_finetune_cpu_{args.seqlen}x{args.grad_accum}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Fine-tuning throughput, SmolLM2-135M fp32, CPU ({result['threads']} threads), "
        f"{args.grad_accum} x {args.seqlen} tokens per optimizer step",
        "",
        "| mode | tokens/s (median) | rounds |",
        "|---|---:|---|",
        f"| masked fine-tuning (50% masks held) | {masked:.1f} | {', '.join(f'{r:.1f}' for r in rates['masked'])} |",
        f"| plain fine-tuning | {plain:.1f} | {', '.join(f'{r:.1f}' for r in rates['plain'])} |",
        f"| forward only (inference) | {forward:.1f} | 1 |",
        "",
        f"masked / plain = **{masked / plain:.3f}**. {args.note}",
        "",
        f"`python experiments/bench_finetune.py --seqlen {args.seqlen} --grad-accum {args.grad_accum} "
        f"--steps {args.steps} --rounds {args.rounds}"
        + (f" --threads {args.threads}`" if args.threads else "`"),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log.info("masked %.1f, plain %.1f (x%.3f), forward %.1f tokens/s -> %s", masked, plain, masked / plain, forward, out)


if __name__ == "__main__":
    main()
