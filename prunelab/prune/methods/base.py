"""The contract between the layer-wise engine and a pruning method.

The engine owns hooks, devices and data flow; a method is pure tensor math on one weight matrix
laid out ``[out_features, in_features]`` (the engine transposes GPT-2's Conv1D) plus the input
statistics it asked for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prunelab.prune.pattern import Pattern

SQ_NORM = "sq_norm"  # per input feature: sum over calibration tokens of x_j^2, shape [in]
HESSIAN = "hessian"  # sum over calibration tokens of x x^T, shape [in, in]


class InputStats:
    """Running sums of what a Linear receives during calibration (kept in float32)."""

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.ntokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device) if SQ_NORM in needs else None
        self.hessian = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if HESSIAN in needs else None
        )

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of any leading shape ``[..., in_features]``."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.sq_norm is not None:
            self.sq_norm += x.pow(2).sum(dim=0).to(self.sq_norm.device)
        if self.hessian is not None:
            x = x.to(self.hessian.device)
            self.hessian.addmm_(x.t(), x)
        self.ntokens += x.shape[0]


@dataclass
class PruneResult:
    """A pruned weight and its keep-mask (True = kept), both ``[out, in]``."""

    weight: torch.Tensor
    mask: torch.Tensor


class PruningMethod(ABC):
    """One pruning method. Subclasses register themselves in ``prunelab.prune.methods.METHODS``."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # which InputStats the engine must collect
    # which InputStats OWL's outlier pre-pass collects for outlier_scores (when the run calibrates):
    # ‖X‖² is enough for |W|·‖X‖, so no method pays for a Hessian twice
    outlier_needs: ClassVar[frozenset[str]] = frozenset({SQ_NORM})

    def __init__(self, **params: Any):
        self.params = params

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern) -> PruneResult:
        """Return the pruned weight for a target sparsity (ignored for N:M, which fixes it).

        Must not modify ``stats`` in place: the engine shares one InputStats between modules that
        read the same tensor (q/k/v, gate/up).
        """

    def outlier_scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """Per-weight importance used by OWL to measure outliers (|W|·‖X‖ by default when available)."""
        if stats is not None and stats.sq_norm is not None:
            return weight.abs() * stats.sq_norm.sqrt().unsqueeze(0)
        return weight.abs()
