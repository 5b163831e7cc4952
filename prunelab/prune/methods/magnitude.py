"""Magnitude pruning: drop the weights of smallest |W| (no calibration data needed)."""

from __future__ import annotations

import torch

from prunelab.prune.masks import build_mask
from prunelab.prune.methods.base import InputStats, PruneResult, PruningMethod
from prunelab.prune.pattern import Pattern

SCOPES = ("layer", "global")


class MagnitudePruning(PruningMethod):
    """|W| compared across the whole weight matrix (N:M: within each group of M inputs).

    ``scope`` says where the per-module sparsity comes from: ``layer`` uses the engine's target
    as it is; ``global`` (``global_scope``) has the allocation derive each module's target from
    one |W| threshold over all targeted modules (``prunelab.prune.allocation.global_magnitude``).
    Either way this class then applies a per-matrix threshold at the sparsity it is given, which
    reproduces the global selection exactly.
    """

    name = "magnitude"

    def __init__(self, scope: str = "layer"):
        if scope not in SCOPES:
            raise ValueError(f"method.params.scope={scope!r} is not valid for magnitude; use one of {', '.join(SCOPES)}")
        super().__init__(scope=scope)
        self.scope = scope

    @property
    def global_scope(self) -> bool:
        return self.scope == "global"

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              frozen: torch.Tensor | None = None) -> PruneResult:
        mask = build_mask(weight.abs(), sparsity, pattern, per_row=False, frozen=frozen)
        return PruneResult(weight=weight.masked_fill(~mask, 0), mask=mask)
