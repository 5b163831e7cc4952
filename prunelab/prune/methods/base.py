"""The contract between the layer-wise engine and a pruning method.

The engine owns hooks, devices and data flow; a method is pure tensor math on one weight matrix
laid out ``[out_features, in_features]`` (the engine transposes GPT-2's Conv1D) plus the input
statistics it asked for (``InputStats``, defined in ``prunelab.prune.stats`` and re-exported here).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prunelab.prune.pattern import Pattern
from prunelab.prune.stats import HESSIAN, SQ_NORM, InputStats

__all__ = ["HESSIAN", "SQ_NORM", "InputStats", "PruneResult", "PruningMethod"]


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

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the method's draws (JSON); most methods keep none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` returned."""

    @property
    def global_scope(self) -> bool:
        """True when each module's target comes from one |W| threshold over all targeted modules.

        ``prunelab.prune.allocation.module_targets`` then ignores the per-layer targets and uses
        ``global_magnitude``; False (the default) keeps the per-layer targets.
        """
        return False

    @abstractmethod
    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
        frozen: torch.Tensor | None = None,
    ) -> PruneResult:
        """Return the pruned weight for a target sparsity (ignored for N:M, which fixes it).

        ``frozen`` (bool ``[out, in]``, True = pruned by an earlier step) must stay pruned: its entries
        are zero in the result and False in the mask, whatever the method's scores or weight updates
        say (iterative schedules prune monotonically).

        Must not modify ``stats`` in place: the engine shares one InputStats between modules that
        read the same tensor (q/k/v, gate/up). The exception is ``stats.disposable``: True when this
        module is the last to read them, so their buffers may be reused (the engine frees them next).
        """

    def outlier_scores(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        """Per-weight importance used by OWL to measure outliers (|W|·‖X‖ by default when available)."""
        if stats is not None and stats.sq_norm is not None:
            return weight.abs() * stats.sq_norm.sqrt().unsqueeze(0)
        return weight.abs()
