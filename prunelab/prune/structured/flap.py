"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning"): a channel matters when its
input fluctuates across the calibration tokens and its weight column is large (the WIFV metric):

    score_j = Var_tokens(x_j) · ‖W_{:,j}‖²

for the output projection's input channel j (o_proj, down_proj). A neuron is one channel of
down_proj; a head's channels are its head_dim columns of o_proj, and for heads the authors' code
(CASIA-IVA-Lab/FLAP, ``lib/prune.py``, ``prune_flap``) squares the channel metric before anything
else: a head scores Σ_j score_j² over its channels (their uniform structure, UL-UM).

Their adaptive structures (AL-MM, AL-AM) standardise the channel metric *per layer* (``standarlization``:
subtract the layer's mean, divide by its standard deviation, over that layer's channels of one
module kind), take a head's mean over its channels, and then cut all layers at one threshold: per
module kind (AL-MM), or heads and neurons in one ranking weighted by their parameters (AL-AM);
:func:`prunelab.prune.structured.select.standardize` and ``select.global_budget`` do that part.

Removing channel set R is compensated by a bias: the removed channels' mean contribution,
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


def unit_channel_scores(weight: torch.Tensor, variance: torch.Tensor, unit: str) -> torch.Tensor:
    """The per-channel metric FLAP ranks a module kind by: :func:`channel_scores`, squared for heads."""
    scores = channel_scores(weight, variance)
    return scores.pow(2) if unit == "heads" else scores


def unit_scores(weight: torch.Tensor, variance: torch.Tensor, width: int, unit: str = "neurons") -> torch.Tensor:
    """One score per unit of ``width`` channels: the sum of :func:`unit_channel_scores` (uniform structure)."""
    return per_unit(unit_channel_scores(weight, variance, unit), width)


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, removed_channels: torch.Tensor) -> torch.Tensor:
    """The bias ``[out]`` to add to the output projection when ``removed_channels`` go: W_{:,R} · E[x_R]."""
    removed_channels = removed_channels.to(weight.device, torch.long)
    return weight.float()[:, removed_channels] @ mean.float().to(weight.device)[removed_channels]
