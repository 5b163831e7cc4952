"""Magnitude of a unit: the L1 or L2 norm of all the weights it owns (LLM-Pruner's 'element' score
summed over the group: a neuron's gate and up rows and its down column; a head's q rows and o columns)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunelab.prune.structured.units import per_unit


def _norm(values: torch.Tensor, p: int) -> torch.Tensor:
    """Per row of ``values``: Σ|v| (p=1) or Σv² (p=2); sums of these add up across a unit's pieces."""
    if p not in (1, 2):
        raise ValueError(f"magnitude scores use p=1 or p=2, not {p}")
    return values.float().abs().sum(dim=1) if p == 1 else values.float().pow(2).sum(dim=1)


def unit_scores(rows_of: Sequence[torch.Tensor], columns_of: Sequence[torch.Tensor], width: int, p: int = 2) -> torch.Tensor:
    """Norm of each unit's weights.

    Args:
        rows_of: ``[out, in]`` weights whose output rows the units own (gate, up; q).
        columns_of: ``[out, in]`` weights whose input columns the units own (down; o).
        width: rows / columns per unit (1 for neurons, head_dim for heads).
        p: 1 for Σ|w|, 2 for sqrt(Σw²).
    """
    total = None
    for weight in rows_of:
        part = per_unit(_norm(weight, p), width)
        total = part if total is None else total + part
    for weight in columns_of:
        part = per_unit(_norm(weight.t(), p), width)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("a unit needs at least one weight to score")
    return total if p == 1 else total.sqrt()
