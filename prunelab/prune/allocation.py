"""Per-decoder-layer sparsity targets: uniform, OWL, explicit ranges, and global magnitude.

The engine asks two questions and names no allocation: :func:`layer_targets` (one target per
decoder layer, from the ``allocation`` config) and :func:`module_targets` (one per targeted
module: the layer's target, or a share of one global |W| threshold when the method's
``global_scope`` says so). OWL needs the dense model's scores first: it hands the engine's
:data:`ScorePass` a reduction (:func:`outlier_ratio`), and the engine walks the dense model once,
reducing each layer's per-weight scores. Everything below those two entry points is a pure
function of scores, weights and numbers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prunelab.config.schema import KNOWN_ALLOCATIONS, AllocationConfig
from prunelab.config.typed import typed
from prunelab.models.adapters import PrunableModule
from prunelab.progress import progress as show_progress
from prunelab.prune.masks import prune_count
from prunelab.prune.pattern import Pattern

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

LayerReduce = Callable[[Sequence[torch.Tensor]], float]


class ScorePass(Protocol):
    """One walk over the dense model that reduces each decoder layer's per-weight scores.

    Called with the reduction, a timing phase, a progress label and a key naming the reduction with its
    parameters (the engine may read a pass over the same weights and windows back from its cache);
    returns one value per layer (None where no module of the layer is targeted). The engine supplies it; scores come from
    ``PruningMethod.outlier_scores``.
    """

    def __call__(self, reduce: LayerReduce, phase: str, desc: str, key: str | None = None) -> list[float | None]: ...


@dataclass
class LayerTargets:
    """Per-layer targets and, for OWL, the outlier ratios they came from (None: no module targeted)."""

    targets: list[float]
    outlier_ratios: list[float | None] | None = None


def check_sparsity(sparsity: float) -> float:
    """A run-level target: a fraction in [0, 1)."""
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is out of range; use a fraction in [0, 1), e.g. 0.5")
    return sparsity


def _check_num_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be a positive integer")


def uniform(num_layers: int, sparsity: float) -> list[float]:
    """Every layer gets ``sparsity``."""
    _check_num_layers(num_layers)
    return [check_sparsity(sparsity)] * num_layers


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of one layer's scores above ``m`` × their mean, pooled over the layer's modules.

    This is OWL's layer-wise outlier distribution (LOD) entry. Two passes over the tensors (sum,
    then count) in float64 accumulators; no concatenated copy is made.
    """
    if not scores:
        raise ValueError("outlier_ratio needs the scores of at least one module")
    if m <= 0:
        raise ValueError(f"allocation.m={m} must be positive (OWL uses 3 to 10, typically 5)")
    total = sum(s.numel() for s in scores)
    if total == 0:
        raise ValueError("outlier_ratio got only empty score tensors")
    mean = sum(s.sum(dtype=torch.float64).item() for s in scores) / total
    threshold = m * mean
    count = sum(int((s > threshold).sum().item()) for s in scores)
    return count / total


def owl(outlier_ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """OWL (Yin et al. 2024): layers with more outliers are pruned less.

    Ratios are min-max normalised to [0, 2·lam]; layer l gets ``sparsity − (norm_l − mean(norm))``,
    so the targets average to ``sparsity`` and span exactly 2·lam (0 when all ratios are equal).

    Raises:
        ValueError: when a target would leave [0, 1); lower ``lam`` or move ``sparsity``.
    """
    sparsity = check_sparsity(sparsity)
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"allocation.lam={lam} must lie in [0, 1)")
    if not outlier_ratios:
        raise ValueError("owl needs one outlier ratio per decoder layer, got none")
    ratios = torch.tensor([float(r) for r in outlier_ratios], dtype=torch.float64)
    spread = (ratios.max() - ratios.min()).item()
    if spread == 0.0:
        log.warning("OWL: all %d layers have the same outlier ratio; falling back to uniform", len(ratios))
        return [sparsity] * len(ratios)
    norm = (ratios - ratios.min()) / spread * (2.0 * lam)
    targets = sparsity - (norm - norm.mean())
    if targets.min().item() < 0.0 or targets.max().item() >= 1.0:
        raise ValueError(
            f"OWL with sparsity={sparsity} and lam={lam} gives per-layer targets in "
            f"[{targets.min().item():.4f}, {targets.max().item():.4f}], outside [0, 1); lower allocation.lam"
        )
    return targets.tolist()


def _parse_range(key: object, num_layers: int) -> range:
    match = _RANGE.match(str(key))
    if not match:
        raise ValueError(f"allocation.layers key {key!r} is not understood; use a layer index '7' or a range '0-5'")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start
    if stop < start:
        raise ValueError(f"allocation.layers key {key!r} runs backwards; write it as '{stop}-{start}'")
    if stop >= num_layers:
        raise ValueError(
            f"allocation.layers key {key!r} names layer {stop}, but the model has {num_layers} layers (0-{num_layers - 1})"
        )
    return range(start, stop + 1)


def explicit(layers: Mapping[str, float], num_layers: int, default: float) -> list[float]:
    """Targets from index ranges such as ``{"0-5": 0.3, "7": 0.5, "10-29": 0.6}``; others get ``default``.

    Ranges are inclusive on both ends. Raises ValueError for malformed, backwards, overlapping or
    out-of-range keys and for values outside [0, 1).
    """
    _check_num_layers(num_layers)
    targets = [check_sparsity(default)] * num_layers
    owner: dict[int, object] = {}
    for key, value in layers.items():
        try:
            value = check_sparsity(value)
        except ValueError as err:
            raise ValueError(f"allocation.layers[{key!r}]: {err}") from None
        for index in _parse_range(key, num_layers):
            if index in owner:
                raise ValueError(f"allocation.layers keys {owner[index]!r} and {key!r} both set layer {index}")
            owner[index] = key
            targets[index] = value
    return targets


def _ordered_bits(tensor: torch.Tensor) -> torch.Tensor:
    """|x| as int32 whose order equals the order of the float32 values (non-negative IEEE floats)."""
    return tensor.detach().abs().to(torch.float32).view(torch.int32)


def _chunks(weights: Mapping[str, torch.Tensor], chunk: int):
    for name, weight in weights.items():
        flat = weight.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            yield name, _ordered_bits(flat[start : start + chunk])


def global_magnitude(
    weights: Mapping[str, torch.Tensor], sparsity: float, chunk: int = 1 << 24, progress: bool = False
) -> dict[str, float]:
    """Per-module sparsities from one |W| threshold over all modules (global magnitude pruning).

    Exactly ``floor(total·s)`` weights fall under the threshold; ties at the threshold go to
    modules in iteration order. Applying a per-matrix threshold at each module's returned
    sparsity (``floor(numel·s_i)`` smallest) then reproduces the global selection.

    Memory: no concatenated copy. The k-th smallest |W| is found by a radix select on the float32
    bit pattern (two passes, a 65,536-bin histogram each), plus a counting pass. Temporaries are
    a few int32/int64 arrays of ``chunk`` elements (default 2^24: ~200 MB), whatever the model size.
    """
    sparsity = check_sparsity(sparsity)
    if not weights:
        raise ValueError("global_magnitude needs at least one weight")
    total = sum(w.numel() for w in weights.values())
    k = prune_count(total, sparsity)
    if k == 0:
        return {name: 0.0 for name in weights}

    def passes(desc: str):
        return show_progress(_chunks(weights, chunk), desc=desc, leave=False, enabled=progress)

    # Pass 1: histogram of the high 16 bits; find the bin holding the k-th smallest value.
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for _, bits in passes("global magnitude: high bits"):
        high += torch.bincount((bits >> 16).reshape(-1), minlength=1 << 16).cpu()
    cumulative = high.cumsum(0)
    top = int(torch.searchsorted(cumulative, torch.tensor(k)).item())  # first bin with cumulative >= k
    below_top = int(cumulative[top - 1].item()) if top > 0 else 0
    # Pass 2: histogram of the low 16 bits inside that bin.
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for _, bits in passes("global magnitude: low bits"):
        inside = bits[(bits >> 16) == top]
        if inside.numel():
            low += torch.bincount((inside & 0xFFFF).reshape(-1), minlength=1 << 16).cpu()
    bottom = int(torch.searchsorted(low.cumsum(0), torch.tensor(k - below_top)).item())
    threshold_bits = (top << 16) | bottom
    # Pass 3: per-module counts strictly below the threshold and equal to it.
    less: dict[str, int] = {name: 0 for name in weights}
    equal: dict[str, int] = {name: 0 for name in weights}
    for name, bits in passes("global magnitude: counts"):
        less[name] += int((bits < threshold_bits).sum().item())
        equal[name] += int((bits == threshold_bits).sum().item())
    ties = k - sum(less.values())
    result: dict[str, float] = {}
    for name, weight in weights.items():
        take = min(ties, equal[name])
        ties -= take
        result[name] = (less[name] + take) / weight.numel()
    threshold = torch.tensor([threshold_bits], dtype=torch.int32).view(torch.float32).item()
    log.info("global magnitude: |W| threshold %.6g prunes %d of %d weights", threshold, k, total)
    return result


# ---------------------------------------------------------------------------------- entry points
def settings(allocation: AllocationConfig | Mapping[str, Any] | None) -> AllocationConfig:
    """The ``allocation`` block typed (a mapping or None takes the schema's defaults for what it lacks)."""
    return typed(AllocationConfig, allocation, "allocation")


def check_allocation(allocation: AllocationConfig | Mapping[str, Any], pattern: Pattern, global_scope: bool) -> None:
    """Refuse an unknown allocation, and any non-uniform one (or a global scope) with an N:M pattern."""
    name = settings(allocation).name
    if name not in KNOWN_ALLOCATIONS:
        known = ", ".join(KNOWN_ALLOCATIONS[:-1]) + " or " + KNOWN_ALLOCATIONS[-1]
        raise ValueError(f"allocation={name!r} is not known; use {known}")
    if pattern.is_nm and (name != "uniform" or global_scope):
        what = f"allocation={name}" if name != "uniform" else "method.params.scope=global"
        raise ValueError(f"{what} needs pattern=unstructured (N:M fixes every layer's sparsity)")


def describe(allocation: AllocationConfig | Mapping[str, Any], global_scope: bool) -> str:
    """The allocation as the report names it (``owl``, ``uniform (global magnitude)``)."""
    return settings(allocation).name + (" (global magnitude)" if global_scope else "")


def layer_targets(
    allocation: AllocationConfig | Mapping[str, Any], sparsity: float, num_layers: int, score_pass: ScorePass
) -> LayerTargets:
    """One target per decoder layer from the ``allocation`` config (``name``, ``lam``, ``m``, ``layers``).

    ``score_pass`` runs only for OWL (its outlier pre-pass on the dense model).
    """
    allocation = settings(allocation)
    name = allocation.name
    if name == "explicit":
        return LayerTargets(explicit(allocation.layers or {}, num_layers, sparsity))
    if name == "owl":
        return owl_targets(allocation, sparsity, num_layers, score_pass)
    return LayerTargets(uniform(num_layers, sparsity))


def owl_targets(
    allocation: AllocationConfig | Mapping[str, Any], sparsity: float, num_layers: int, score_pass: ScorePass
) -> LayerTargets:
    """OWL over the layers with targeted modules; the others keep ``sparsity``."""
    allocation = settings(allocation)
    m = float(allocation.m)
    ratios = score_pass(lambda scores: outlier_ratio(scores, m), phase="owl_prepass", desc="OWL outlier pre-pass",
                        key=f"owl-outlier-ratio(m={m!r})")  # the reduction, named for the pre-pass cache
    log.info("OWL outlier ratios (m=%g): %s", m, ", ".join("-" if r is None else f"{r:.4f}" for r in ratios))
    pruned = [i for i, r in enumerate(ratios) if r is not None]  # layers with targets
    lam = float(allocation.lam)
    spread = owl([ratios[i] for i in pruned], sparsity, lam)
    targets = [sparsity] * num_layers
    for i, target in zip(pruned, spread):
        targets[i] = target
    return LayerTargets(targets, ratios)


def module_targets(
    modules: Sequence[PrunableModule], layer_targets: Sequence[float], sparsity: float, global_scope: bool
) -> dict[str, float]:
    """Each module's target by full name: its layer's, or from one |W| threshold (``global_scope``)."""
    if global_scope:
        weights = {m.full_name: m.get_weight() for m in modules}
        return global_magnitude(weights, sparsity)
    return {m.full_name: layer_targets[m.layer] for m in modules}
