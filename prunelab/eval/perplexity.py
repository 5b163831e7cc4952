"""Perplexity over non-overlapping windows (the SparseGPT / Wanda protocol).

The token stream is cut into ``numel // seqlen`` windows of ``seqlen`` tokens; each window is
scored independently (no context carried over) and PPL = exp(mean NLL over every predicted token).

:func:`perplexity` scores a model in memory; :func:`perplexity_streamed` scores a checkpoint that
is never loaded whole (``model.stream=true``): the windows go through the decoder layers one layer
at a time, each read from disk (the layer conveyor, ``prunelab.prune.walk``), then through the
model's own final norm and head (``prunelab.prune.capture.replay_outputs``). The same windows, the
same record.
"""

from __future__ import annotations

import logging
import math
import os
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
    ids, total_windows = _windows(stream, seqlen, max_windows)
    device = model_device(model)
    window_nll: list[float] = []
    for start in show_progress(range(0, len(ids), batch_size), desc=f"perplexity {stream.name}", unit="batch", enabled=progress):
        batch = ids[start : start + batch_size].to(device)
        window_nll.extend(_window_nll(model(input_ids=batch, use_cache=False).logits, batch))
    return _record(stream, seqlen, total_windows, window_nll)


def _windows(stream: TokenStream, seqlen: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    """The scored windows ``[windows, seqlen]`` and how many the whole stream holds."""
    total_windows = stream.numel // seqlen
    if total_windows == 0:
        raise ValueError(f"{stream.name}: {stream.numel} tokens are fewer than one window of seqlen={seqlen}")
    windows = total_windows if max_windows is None else min(max_windows, total_windows)
    return stream.ids[0, : windows * seqlen].view(windows, seqlen), total_windows


NLL_CHUNK = 256  # positions whose float64 log-softmax is computed at once (256 x 49,152 x 8 bytes = 100 MB)


def _window_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Mean NLL of each window's next-token predictions, computed and summed in float64.

    A float32 log-softmax over a 49k vocabulary reads a few 1e-5 low on every token, and that bias
    does not average out: the perplexity would sit ~1e-4 below the exact value on every run. The
    logits are upcast a chunk of positions at a time, so the float64 copy stays small.
    """
    targets = batch[:, 1:].to(logits.device)
    predicted = logits.shape[1] - 1
    total = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    for start in range(0, predicted, NLL_CHUNK):
        end = min(start + NLL_CHUNK, predicted)
        chunk = logits[:, start:end, :].to(torch.float64)
        total += F.cross_entropy(chunk.transpose(1, 2), targets[:, start:end], reduction="none").sum(dim=1)
    return (total / predicted).tolist()


def _record(stream: TokenStream, seqlen: int, total_windows: int, window_nll: list[float]) -> dict[str, Any]:
    windows = len(window_nll)
    count = windows * (seqlen - 1)
    mean_nll = sum(window_nll) / windows  # every window predicts seqlen - 1 tokens
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


@torch.inference_mode()
def perplexity_streamed(
    folder: str | os.PathLike,
    stream: TokenStream,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """:func:`perplexity` of the checkpoint in ``folder`` with one decoder layer in memory at a time.

    Memory holds one layer, the embeddings and head, and every scored window's hidden states
    (windows x seqlen x hidden); cap ``max_windows`` for a big model.
    """
    from prunelab.models.streaming import StreamedLayers, open_streamed
    from prunelab.prune.capture import replay_outputs
    from prunelab.prune.walk import LayerWalk

    device = torch.device(device)
    ids, total_windows = _windows(stream, seqlen, max_windows)
    streamed = open_streamed(folder, dtype, head=True, trust_remote_code=trust_remote_code)
    walk = LayerWalk(streamed.adapter, device, residence=StreamedLayers(streamed, None))
    batches = list(ids.split(batch_size))
    walk.capture(batches)
    finals = walk.run(walk.forward, desc=f"perplexity {stream.name} (layer by layer)")
    window_nll: list[float] = []
    model = streamed.model
    with replay_outputs(streamed.adapter) as give:
        model.to(device)
        try:
            for batch, hidden in zip(batches, finals):
                give(hidden)
                window_nll.extend(_window_nll(model(input_ids=batch.to(device), use_cache=False).logits, batch))
        finally:
            model.to("cpu")
    record = _record(stream, seqlen, total_windows, window_nll)
    record["streamed"] = True
    return record
