"""What pruning achieved, read off the weights: sparsity overall, per layer, per module type,
N:M conformity; and the record the engine returns (:class:`PruneReport`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.models.adapters import PrunableModule, select_modules
from prunelab.prune.masks import nm_violations
from prunelab.prune.pattern import Pattern


@dataclass
class SparsitySummary:
    """Zero fractions of the selected modules' weights, as they are in the model.

    Attributes:
        overall: zeros / weights over all selected modules.
        per_layer: decoder-layer index → zero fraction over its selected modules.
        per_type: module name inside a layer (``self_attn.q_proj``) → zero fraction over layers.
        per_module: full module name → zero fraction.
        model_fraction: zeros / all parameters of the model (embeddings, norms and head included).
        pattern: the N:M pattern checked, or ``unstructured``.
        nm_violations: full module name → groups of M inputs holding fewer than N zeros (only
            modules with at least one; empty for unstructured or a conforming model).
    """

    overall: float
    per_layer: dict[int, float]
    per_type: dict[str, float]
    per_module: dict[str, float]
    model_fraction: float
    pattern: str = "unstructured"
    nm_violations: dict[str, int] = field(default_factory=dict)

    @property
    def nm_ok(self) -> bool:
        return not self.nm_violations

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_layer"] = {str(k): v for k, v in self.per_layer.items()}
        out["nm_ok"] = self.nm_ok
        return out


class SparsityTally:
    """Zero counts of prunable modules, added a module at a time; :meth:`summary` turns them into
    a :class:`SparsitySummary`. A streamed model is measured layer by layer while each is resident."""

    def __init__(self, pattern: Pattern | str | None = None):
        self.pattern = Pattern.parse(pattern) if isinstance(pattern, str) else (pattern or Pattern())
        self.by_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        self.by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.per_module: dict[str, float] = {}
        self.violations: dict[str, int] = {}
        self.zeros = self.total = 0

    @torch.no_grad()
    def add(self, m: PrunableModule) -> dict[str, Any]:
        """Count ``m``'s zeros; with an N:M pattern, check it group by group (-1: its width cannot conform).

        Returns the counts, which :meth:`add_counts` takes (a resumed run's finished layers).
        """
        weight = m.get_weight()
        count = weight.numel()
        zeros = count - int(torch.count_nonzero(weight))  # no mask the size of the weight
        bad = 0
        if self.pattern.is_nm:
            bad = nm_violations(weight, self.pattern) if m.in_features % self.pattern.m == 0 else -1
        counts = {"name": m.full_name, "layer": m.layer, "kind": m.name, "zeros": zeros, "count": count, "violations": bad}
        self.add_counts(**counts)
        return counts

    def add_counts(self, name: str, layer: int, kind: str, zeros: int, count: int, violations: int) -> None:
        """Count a module measured before (:meth:`add`'s return value)."""
        self.per_module[name] = zeros / count if count else 0.0
        for bucket in (self.by_layer[layer], self.by_type[kind]):
            bucket[0] += zeros
            bucket[1] += count
        self.zeros += zeros
        self.total += count
        if violations:
            self.violations[name] = violations

    def summary(self, model_zeros: int, model_count: int) -> SparsitySummary:
        """The summary, given the zeros and entries of all the model's parameters."""
        return SparsitySummary(
            overall=self.zeros / self.total if self.total else 0.0,
            per_layer={k: z / n for k, (z, n) in sorted(self.by_layer.items())},
            per_type={k: z / n for k, (z, n) in self.by_type.items()},
            per_module=dict(self.per_module),
            model_fraction=model_zeros / model_count if model_count else 0.0,
            pattern=str(self.pattern),
            nm_violations=dict(self.violations),
        )


@torch.no_grad()
def measure_sparsity(
    model: nn.Module,
    targets: Sequence[str] = (".*",),
    skip: Sequence[str] = (),
    pattern: Pattern | str | None = None,
) -> SparsitySummary:
    """Measure the zero fractions of the modules ``targets``/``skip`` select (see ``select_modules``).

    With an N:M ``pattern`` every selected module is checked group by group; a module whose
    input width is not a multiple of M cannot conform and is reported with violations = -1.
    """
    tally = SparsityTally(pattern)
    for m in select_modules(model, targets, skip):
        tally.add(m)
    all_zeros = sum(int((p == 0).sum().item()) for p in model.parameters())
    all_count = sum(p.numel() for p in model.parameters())
    return tally.summary(all_zeros, all_count)


def check_nm(model: nn.Module, pattern: Pattern | str, targets: Sequence[str] = (".*",), skip: Sequence[str] = ()) -> dict[str, int]:
    """Modules that break an N:M pattern → number of offending groups (empty when all conform)."""
    return measure_sparsity(model, targets, skip, pattern).nm_violations


@dataclass
class ModuleRecord:
    """One pruned module: what was asked, what came out, how long the method took."""

    name: str
    layer: int
    kind: str
    shape: tuple[int, int]  # [out, in]
    target: float
    achieved: float
    solve_s: float


@dataclass
class PruneReport:
    """What ``prune_model`` did. ``masks`` (keep-masks in parameter layout) only when asked for."""

    method: str
    params: dict[str, Any]
    pattern: str
    sparsity: float
    allocation: str
    sequential: bool
    device: str
    nsamples: int
    seqlen: int
    layer_targets: list[float]
    modules: list[ModuleRecord]
    summary: SparsitySummary
    timings: dict[str, float]
    peak_memory_mb: dict[str, float]
    layer_forwards: int  # decoder-layer passes over the whole calibration set
    outlier_ratios: list[float | None] | None = None  # OWL: per layer (None: no module targeted)
    prepass_cache: dict[str, Any] | None = None  # OWL's pre-pass: the cache key and whether it was read back
    stats_cache: dict[str, Any] | None = None  # sequential=false: the dense statistics' cache key and whether read back
    streamed: dict[str, Any] | None = None  # prune_streamed: what was read and written, the most layers resident
    masks: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (masks left out)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("masks", "summary", "modules")}
        out["modules"] = [asdict(m) for m in self.modules]
        out["summary"] = self.summary.to_dict()
        return out
