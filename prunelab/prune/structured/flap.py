"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning"): a channel matters when its
input fluctuates across the calibration tokens and its weight column is large:

    score_j = Var_tokens(x_j) · ‖W_{:,j}‖²

for the output projection (o_proj, down_proj). Scores of different module kinds are standardised
(subtract the mean, divide by the standard deviation over all layers of that kind) before a global
ranking. Removing channel set R is compensated by a bias: the removed channels' mean contribution,
b' = b + W_{:,R} · E[x_R], so the layer's mean output over the calibration set is unchanged.
"""

from __future__ import annotations

import torch

from prunelab.prune.structured.units import per_unit


def channel_moments(total: torch.Tensor, sq_norm: torch.Tensor, ntokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance per input channel from Σx and Σx² over ``ntokens`` tokens."""
    if ntokens < 1:
        raise ValueError("channel moments need at least one calibration token")
    mean = total.double() / ntokens
    variance = (sq_norm.double() / ntokens - mean.pow(2)).clamp_min(0)
    return mean.float(), variance.float()


def channel_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]``, ``variance`` ``[in]`` → fluctuation · squared column norm, ``[in]``."""
    if variance.shape != (weight.shape[1],):
        raise ValueError(f"variance {tuple(variance.shape)} does not match in_features={weight.shape[1]}")
    return variance.float() * weight.float().pow(2).sum(dim=0)


def unit_scores(weight: torch.Tensor, variance: torch.Tensor, width: int) -> torch.Tensor:
    return per_unit(channel_scores(weight, variance), width)


def standardize(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Standardise one module kind's unit scores over all its layers (FLAP's adaptive structure)."""
    flat = torch.cat([s.float().flatten() for s in scores])
    std = flat.std()
    if not torch.isfinite(std) or std == 0:
        std = torch.tensor(1.0)
    return [(s.float() - flat.mean()) / std for s in scores]


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, removed_channels: torch.Tensor) -> torch.Tensor:
    """The bias ``[out]`` to add to the output projection when ``removed_channels`` go: W_{:,R} · E[x_R]."""
    removed_channels = removed_channels.to(weight.device, torch.long)
    return weight.float()[:, removed_channels] @ mean.float().to(weight.device)[removed_channels]
