"""Layer importance from hidden states (no weights): ShortGPT's Block Influence (Men et al. 2024),
BI_l = 1 − mean over tokens of cos(x_in, x_out) for decoder layer l, and the angular distance of a
block of n consecutive layers (Gromov et al. 2024), arccos(cos(x_l, x_{l+n})) / π averaged over
tokens. Both are small when a layer (block) barely turns the hidden state: the first to remove."""

from __future__ import annotations

import math

import torch


def cosines(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """cos(x_in, x_out) per token of ``[..., hidden]`` states, in float64."""
    if x_in.shape != x_out.shape:
        raise ValueError(f"hidden states of shapes {tuple(x_in.shape)} and {tuple(x_out.shape)} cannot be compared")
    a = x_in.reshape(-1, x_in.shape[-1]).double()
    b = x_out.reshape(-1, x_out.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """1 − E[cos(x_in, x_out)] over every token of ``[..., hidden]`` states."""
    return float(1.0 - cosines(x_in, x_out).mean())


def angular_distance(x_start: torch.Tensor, x_end: torch.Tensor) -> float:
    """E[arccos(cos(x_start, x_end)) / π] over tokens: 0 = same direction, 1 = opposite."""
    return float((cosines(x_start, x_end).clamp(-1, 1).acos() / math.pi).mean())


def best_block(hidden: list[torch.Tensor], n: int) -> tuple[int, list[float]]:
    """The first layer of the block of ``n`` consecutive layers with the smallest angular distance.

    ``hidden[l]`` is the input of layer l (``hidden[-1]`` the last layer's output), so a model with L
    layers gives L + 1 states. Returns (start, distances for every start).
    """
    layers = len(hidden) - 1
    if not 1 <= n <= layers:
        raise ValueError(f"a block of {n} layers does not fit in {layers} layers")
    distances = [angular_distance(hidden[start], hidden[start + n]) for start in range(layers - n + 1)]
    return min(range(len(distances)), key=distances.__getitem__), distances
