"""Which units go, given one score per unit per layer (higher = more important).

- :func:`uniform`: the same number of units leaves every layer (``protect``: layers left whole, as
  LLM-Pruner keeps the first and last layers); the widths stay equal, so the config stays standard.
- :func:`standardize`: FLAP's per-layer standardisation, (v − mean) / std over one layer's values,
  which makes the scores of different layers comparable before any ranking over layers.
- :func:`global_ranking`: the lowest-scoring units over all layers go (FLAP's adaptive structure
  AL-MM, given per-layer standardised scores); per-layer widths then differ. Every layer keeps at
  least ``min_keep``.
- :func:`global_budget`: several module kinds in one ranking (FLAP's AL-AM), each unit weighted by
  the parameters it owns, until the removed parameters come closest to a share of all of them.
- :func:`heads_in_groups` and :func:`whole_groups`: grouped-query attention, where each KV group must
  keep as many query heads as the others: the weakest head of every group, or the weakest groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from prunelab.prune.structured.units import per_unit


def _count(units: int, fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of units to remove must lie in [0, 1), got {fraction}")
    return int(round(units * fraction))


def uniform(scores: Sequence[torch.Tensor], fraction: float, protect: Iterable[int] = ()) -> list[list[int]]:
    """Per layer, the indices of its ``round(fraction × units)`` lowest-scoring units (none in ``protect``)."""
    protected = set(protect)
    out = []
    for layer, layer_scores in enumerate(scores):
        count = 0 if layer in protected else _count(layer_scores.numel(), fraction)
        out.append(sorted(torch.argsort(layer_scores.float(), stable=True)[:count].tolist()))
    return out


def standardize(values: torch.Tensor, width: int = 1) -> torch.Tensor:
    """One layer's ``values`` (its channels' or units' scores) minus their mean, over their standard deviation
    (unbiased, as ``torch.std``), then averaged over consecutive runs of ``width`` (a head's channels).

    A layer whose values are all equal scores 0 everywhere."""
    flat = values.float().flatten()
    std = flat.std() if flat.numel() > 1 else torch.tensor(0.0)
    if not torch.isfinite(std) or std == 0:
        std = torch.tensor(1.0)
    return per_unit((flat - flat.mean()) / std, width) / width


def _take_lowest(scores: Sequence[Sequence[torch.Tensor]], costs: Sequence[Sequence[float]], budget: float,
                 protect: Iterable[int], min_keep: int) -> tuple[list[list[list[int]]], float]:
    """Walk all units of every kind (``scores[kind][layer]``) from the lowest score up, removing each while
    the removed cost gets closer to ``budget`` (a unit that would leave its layer's kind with fewer than
    ``min_keep`` units is passed over); stop at the first that would overshoot. Returns (removed
    indices per kind per layer, the cost removed)."""
    protected = set(protect)
    candidates = sorted((float(value), kind, layer, unit) for kind, per_layer in enumerate(scores)
                        for layer, layer_scores in enumerate(per_layer) if layer not in protected
                        for unit, value in enumerate(layer_scores.tolist()))
    removed: list[list[list[int]]] = [[[] for _ in per_layer] for per_layer in scores]
    spent = 0.0
    for _, kind, layer, unit in candidates:
        if scores[kind][layer].numel() - len(removed[kind][layer]) <= min_keep:
            continue
        cost = costs[kind][layer]
        if spent + cost / 2 >= budget:  # removing it would leave the removed cost farther from the budget
            break
        removed[kind][layer].append(unit)
        spent += cost
    return [[sorted(r) for r in per_layer] for per_layer in removed], spent


def global_ranking(scores: Sequence[torch.Tensor], fraction: float, protect: Iterable[int] = (),
                   min_keep: int = 1) -> list[list[int]]:
    """The ``round(fraction × all units)`` lowest scores over every layer not in ``protect``, each layer
    keeping at least ``min_keep`` units (a layer's last units are passed over, the next-lowest taken).

    The scores must be comparable across layers: FLAP standardises each layer's first (:func:`standardize`)."""
    count = _count(sum(s.numel() for s in scores), fraction)
    removed, taken = _take_lowest([scores], [[1.0] * len(scores)], count, protect, min_keep)
    if taken < count:
        raise ValueError(f"cannot remove {count} units while every layer keeps {min_keep}")
    return removed[0]


def global_budget(scores: Sequence[Sequence[torch.Tensor]], costs: Sequence[Sequence[float]], fraction: float,
                  protect: Iterable[int] = (), min_keep: int = 1) -> list[list[list[int]]]:
    """Several module kinds ranked together (FLAP's AL-AM): ``scores[kind][layer]`` (comparable across
    kinds and layers), ``costs[kind][layer]`` the parameters one unit of that kind owns in that layer.

    The lowest-scoring units go until the removed parameters are closest to ``fraction`` of all units'
    parameters (protected layers count in the total but lose nothing); each layer keeps ``min_keep``
    units of every kind. Returns the removed indices per kind per layer.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of parameters to remove must lie in [0, 1), got {fraction}")
    total = sum(costs[kind][layer] * s.numel() for kind, per_layer in enumerate(scores)
                for layer, s in enumerate(per_layer))
    return _take_lowest(scores, costs, fraction * total, protect, min_keep)[0]


def heads_in_groups(head_scores: torch.Tensor, kv_heads: int, per_group: int) -> list[int]:
    """The ``per_group`` lowest-scoring query heads inside each KV group (query heads in group order)."""
    heads = head_scores.numel()
    if heads % kv_heads or not 0 <= per_group < heads // kv_heads:
        raise ValueError(f"{heads} query heads in {kv_heads} groups cannot each lose {per_group}")
    size = heads // kv_heads
    removed = []
    for group in range(kv_heads):
        local = torch.argsort(head_scores[group * size:(group + 1) * size].float(), stable=True)[:per_group]
        removed.extend(group * size + int(i) for i in local)
    return sorted(removed)


def whole_groups(head_scores: torch.Tensor, kv_heads: int, groups: int) -> list[int]:
    """The query heads of the ``groups`` KV groups with the lowest summed head scores."""
    heads = head_scores.numel()
    if heads % kv_heads or not 0 <= groups < kv_heads:
        raise ValueError(f"{kv_heads} KV groups cannot lose {groups}")
    size = heads // kv_heads
    group_scores = head_scores.float().reshape(kv_heads, size).sum(dim=1)
    weakest = torch.argsort(group_scores, stable=True)[:groups].tolist()
    return sorted(g * size + i for g in weakest for i in range(size))
