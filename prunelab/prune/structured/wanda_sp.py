"""Wanda-sp (the structured Wanda of An et al. 2024, FLAP's baseline): a channel's score is
Σ_i |W_ij| · ‖X_j‖₂ over the output projection's column j, with ‖X_j‖ over the calibration tokens;
a unit's score is the sum over its channels."""

from __future__ import annotations

import torch

from prunelab.prune.structured.units import per_unit


def channel_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` of o_proj / down_proj, ``sq_norm`` ``[in]`` = Σ_tokens x_j²."""
    if sq_norm.shape != (weight.shape[1],):
        raise ValueError(f"sq_norm {tuple(sq_norm.shape)} does not match in_features={weight.shape[1]}")
    return weight.float().abs().sum(dim=0) * sq_norm.float().sqrt()


def unit_scores(weight: torch.Tensor, sq_norm: torch.Tensor, width: int) -> torch.Tensor:
    return per_unit(channel_scores(weight, sq_norm), width)
