"""Input statistics of the targeted Linear modules, gathered by forward hooks during calibration.

:class:`InputStats` holds the running sums a method asks for (``needs``: ``SQ_NORM`` for ‖X‖²,
``HESSIAN`` for X Xᵀ). :class:`StatsCollector` hooks one decoder layer's targeted modules and feeds
each module's input into its ``InputStats``; :func:`collect_stats` wraps it so the hooks are
always removed. The layer conveyor (``prunelab.prune.walk``) calls ``end_batch`` after every batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from prunelab.models.adapters import PrunableModule

log = logging.getLogger(__name__)

SQ_NORM = "sq_norm"  # per input feature: sum over calibration tokens of x_j^2, shape [in]
HESSIAN = "hessian"  # sum over calibration tokens of x x^T, shape [in, in]
SUM = "sum"  # per input feature: sum over calibration tokens of x_j, shape [in] (with SQ_NORM: mean, variance)


class InputStats:
    """Running sums of what a Linear receives during calibration (float32; the plain sum in float64,
    so a mean over millions of tokens does not drift).

    ``disposable`` is set by the engine while the last module that reads these sums is solved: the
    method may then overwrite them (SparseGPT factors the Hessian in its own storage).
    """

    def __init__(self, in_features: int, needs: frozenset[str], device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.ntokens = 0
        self.disposable = False
        # with SUM (mean and variance wanted) the squares are summed in float64 too: var = E[x²] - E[x]²
        sq_dtype = torch.float64 if SUM in needs else torch.float32
        self.sq_norm = torch.zeros(in_features, dtype=sq_dtype, device=device) if SQ_NORM in needs else None
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device) if SUM in needs else None
        self.hessian = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if HESSIAN in needs else None
        )

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs of any leading shape ``[..., in_features]``."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.sq_norm is not None:
            squares = x.pow(2).sum(dim=0) if self.sq_norm.dtype == torch.float32 else \
                x.double().pow(2).sum(dim=0)
            self.sq_norm += squares.to(self.sq_norm.device)
        if self.total is not None:
            self.total += x.sum(dim=0, dtype=torch.float64).to(self.total.device)
        if self.hessian is not None:
            x = x.to(self.hessian.device)
            self.hessian.addmm_(x.t(), x)
        self.ntokens += x.shape[0]


class StatsCollector:
    """Forward pre-hooks that accumulate ``InputStats`` for a layer's targeted modules.

    Modules that receive the very same, unmodified tensor (q/k/v, gate/up) share one
    ``InputStats``. The sharing is found on the first batch by object identity plus the tensor's
    in-place version counter (the tensors are held for the batch, so a freed address cannot be
    reused to fake identity) and re-checked on every later batch.
    """

    def __init__(self, modules: Sequence[PrunableModule], needs: frozenset[str], device: torch.device):
        self.needs = needs
        self.device = device
        self.stats: dict[str, InputStats] = {}
        self.shared_with: dict[str, str] = {}
        self._modules = {m.name: m for m in modules}
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}  # this batch: module → (input, its version)
        self._first_batch = True
        self._handles = [m.module.register_forward_pre_hook(self._hook(m.name)) for m in modules]

    def _same_input(self, owner: str, x: torch.Tensor) -> bool:
        seen = self._seen.get(owner)
        return seen is not None and seen[0] is x and seen[1] == x._version

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            owner = self.shared_with.get(name)
            if self._first_batch:
                owner = next((other for other in self._seen if self._same_input(other, x)), None)
                if owner is not None:
                    self.shared_with[name] = owner
                    self.stats[name] = self.stats[owner]
                    return
                self.stats[name] = InputStats(self._modules[name].in_features, self.needs, self.device)
            elif owner is not None:
                if not self._same_input(owner, x):
                    raise RuntimeError(f"{name} stopped receiving the same input as {owner}; cannot share statistics")
                return
            self.stats[name].add(x)
            self._seen[name] = (x, x._version)

        return hook

    def end_batch(self) -> None:
        """Call after every batch: the next batch's tensors are new objects."""
        self._first_batch = False
        self._seen.clear()

    def remove(self) -> None:
        """Remove the hooks; modules that never ran get empty statistics (and a warning)."""
        for handle in self._handles:
            handle.remove()
        self._seen.clear()
        for name, module in self._modules.items():
            if name not in self.stats:
                log.warning("%s never ran during calibration; its statistics are empty", module.full_name)
                self.stats[name] = InputStats(module.in_features, self.needs, self.device)


@contextmanager
def collect_stats(
    modules: Sequence[PrunableModule], needs: frozenset[str], device: torch.device
) -> Iterator[StatsCollector]:
    """Hook ``modules`` for the duration of the block; the hooks are removed on the way out."""
    collector = StatsCollector(modules, needs, device)
    try:
        yield collector
    finally:
        collector.remove()
