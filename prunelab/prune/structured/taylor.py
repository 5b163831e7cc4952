"""First-order Taylor importance (LLM-Pruner, Ma et al. 2023): removing weight w changes the loss by
about -w·∂L/∂w, so a unit scores Σ |w · g| over all the weights it owns, with g the gradient of the
causal-LM loss summed over calibration windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunelab.prune.structured.units import per_unit


def unit_scores(rows_of: Sequence[tuple[torch.Tensor, torch.Tensor]],
                columns_of: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
    """``(weight, grad)`` pairs, both ``[out, in]``: rows owned (gate, up; q), columns owned (down; o)."""
    total = None
    for weight, grad in rows_of:
        part = per_unit((weight.float() * grad.float()).abs().sum(dim=1), width)
        total = part if total is None else total + part
    for weight, grad in columns_of:
        part = per_unit((weight.float() * grad.float()).abs().sum(dim=0), width)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("a unit needs at least one (weight, gradient) pair to score")
    return total
