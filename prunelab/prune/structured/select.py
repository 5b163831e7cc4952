"""Which units go, given one score per unit per layer (higher = more important).

- :func:`uniform`: the same number of units leaves every layer (``protect``: layers left whole, as
  LLM-Pruner keeps the first and last layers); the widths stay equal, so the config stays standard.
- :func:`global_ranking`: the lowest-scoring units over all layers go (FLAP's adaptive structure,
  scores standardised first); per-layer widths then differ. Every layer keeps at least ``min_keep``.
- :func:`heads_in_groups` and :func:`whole_groups`: grouped-query attention, where each KV group must
  keep as many query heads as the others: the weakest head of every group, or the weakest groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


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


def global_ranking(scores: Sequence[torch.Tensor], fraction: float, protect: Iterable[int] = (),
                   min_keep: int = 1) -> list[list[int]]:
    """The ``round(fraction × all units)`` lowest scores over every layer not in ``protect``, each layer
    keeping at least ``min_keep`` units (a layer's last units are passed over, the next-lowest taken)."""
    protected = set(protect)
    total = sum(s.numel() for s in scores)
    count = _count(total, fraction)
    candidates = [(float(value), layer, unit) for layer, layer_scores in enumerate(scores) if layer not in protected
                  for unit, value in enumerate(layer_scores.tolist())]
    candidates.sort()
    removed: list[list[int]] = [[] for _ in scores]
    for _, layer, unit in candidates:
        if count == 0:
            break
        if scores[layer].numel() - len(removed[layer]) > min_keep:
            removed[layer].append(unit)
            count -= 1
    if count:
        raise ValueError(f"cannot remove {_count(total, fraction)} units while every layer keeps {min_keep}")
    return [sorted(r) for r in removed]


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
