"""Perplexity over non-overlapping windows (the SparseGPT / Wanda protocol).

The token stream is cut into ``numel // seqlen`` windows of ``seqlen`` tokens; each window is
scored independently (no context carried over) and PPL = exp(mean NLL over every predicted token).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from prunelab.data.tokens import TokenStream
from prunelab.progress import progress as show_progress

log = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    stream: TokenStream,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``stream`` in windows of ``seqlen`` tokens and return PPL with its protocol record."""
    total_windows = stream.numel // seqlen
    if total_windows == 0:
        raise ValueError(f"{stream.name}: {stream.numel} tokens are fewer than one window of seqlen={seqlen}")
    windows = total_windows if max_windows is None else min(max_windows, total_windows)
    device = model_device(model)
    ids = stream.ids[0, : windows * seqlen].view(windows, seqlen)
    window_nll: list[float] = []
    count = 0
    for start in show_progress(range(0, windows, batch_size), desc=f"perplexity {stream.name}", unit="batch", enabled=progress):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        shift_logits = logits[:, :-1, :].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(shift_logits.transpose(1, 2), targets, reduction="none")  # [batch, seqlen - 1]
        window_nll.extend(nll.mean(dim=1).tolist())
        count += targets.numel()
    mean_nll = sum(window_nll) / len(window_nll)  # every window predicts seqlen - 1 tokens
    result = {
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "seqlen": seqlen,
        "windows": windows,
        "total_windows": total_windows,
        "full_split": windows == total_windows,  # False for quick presets that score the first windows only
        "predicted_tokens": count,
        "stream_tokens": stream.numel,
        "fingerprint": stream.fingerprint,
        "protocol": stream.protocol + f"; {windows} of {total_windows} non-overlapping windows of {seqlen}",
        "origin": stream.origin,
        "window_mean_nll": window_nll,
    }
    log.info("%s ppl %.3f (%d windows of %d)", stream.name, result["ppl"], windows, seqlen)
    return result
