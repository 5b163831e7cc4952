"""Channels and units: a unit (head, neuron) owns a contiguous run of ``width`` channels."""

from __future__ import annotations

import torch


def per_unit(channel_scores: torch.Tensor, width: int) -> torch.Tensor:
    """Sum ``[channels]`` scores over consecutive runs of ``width`` (1: neurons, head_dim: heads)."""
    if channel_scores.dim() != 1 or channel_scores.numel() % width:
        raise ValueError(f"{tuple(channel_scores.shape)} channel scores do not split into units of {width}")
    return channel_scores.reshape(-1, width).sum(dim=1)


def columns(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` weight → its input columns as rows ``[in, out]`` (float32)."""
    return weight.float().t()
