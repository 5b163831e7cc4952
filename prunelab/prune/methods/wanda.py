"""Wanda (Sun et al. 2024): score |W_ij|·‖X_j‖₂, compared within each output row."""

from __future__ import annotations

import torch

from prunelab.prune.masks import build_mask
from prunelab.prune.methods.base import SQ_NORM, InputStats, PruneResult, PruningMethod
from prunelab.prune.pattern import Pattern


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W|·sqrt(Σ_tokens x_j²) in float32, ``[out, in]``."""
    if sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"sq_norm has shape {tuple(sq_norm.shape)} but the weight has in_features={weight.shape[1]}; "
            "the statistics were collected for another module"
        )
    scores = weight.abs().to(torch.float32)  # one [out, in] temporary, scaled in place
    return scores.mul_(sq_norm.to(weight.device, torch.float32).sqrt().unsqueeze(0))


class WandaPruning(PruningMethod):
    """Wanda: no weight update; N:M patterns compare within each group of M inputs."""

    name = "wanda"
    needs = frozenset({SQ_NORM})

    def __init__(self) -> None:
        super().__init__()

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              frozen: torch.Tensor | None = None) -> PruneResult:
        if stats is None or stats.sq_norm is None:
            raise ValueError("wanda needs input statistics with sq_norm; the engine must collect SQ_NORM for it")
        mask = build_mask(wanda_scores(weight, stats.sq_norm), sparsity, pattern, per_row=True, frozen=frozen)
        return PruneResult(weight=weight.masked_fill(~mask, 0), mask=mask)
