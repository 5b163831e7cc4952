"""Keep-mask builders on a score matrix laid out ``[out_features, in_features]``.

Every builder returns a boolean mask of the score's shape and device where True means "keep".
Lower score = less important. Counts are exact: a selection at sparsity ``s`` over ``n``
entries drops exactly ``prune_count(n, s)`` = floor(n·s) of them (ties are broken arbitrarily
but the count never moves).
"""

from __future__ import annotations

import torch

from prunelab.prune.pattern import Pattern

# n·s within this distance below an integer counts as that integer: int(100 * 0.57) is 56 in floats.
_COUNT_EPS = 1e-6
# entries per kthvalue call in unstructured_per_row_mask (its sorted copy: 64 MB of float32)
_ROW_CHUNK = 1 << 24


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float, or raise ValueError when it is not a fraction in [0, 1].

    1.0 (the whole matrix) is accepted here because a global threshold can empty a module; the
    run-level targets are checked against [0, 1) by the config and by allocation.
    """
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} is out of range; use a fraction in [0, 1], e.g. 0.5")
    return sparsity


def prune_count(n: int, sparsity: float) -> int:
    """How many of ``n`` entries a selection at ``sparsity`` drops: floor(n·s), robust to float rounding."""
    return min(n, int(n * check_sparsity(sparsity) + _COUNT_EPS))


def check_nm_width(in_features: int, pattern: Pattern) -> None:
    """Raise ValueError when ``in_features`` cannot be cut into groups of M consecutive inputs."""
    if pattern.is_nm and in_features % pattern.m != 0:
        raise ValueError(
            f"pattern={pattern} needs in_features divisible by M={pattern.m}, but this weight has "
            f"in_features={in_features}; choose a pattern whose M divides {in_features}, or skip this "
            f"module (prune.skip)"
        )


def _check_matrix(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"expected a score matrix [out_features, in_features], got shape {tuple(scores.shape)}")


def unstructured_per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the ``floor(in·s)`` lowest scores of every output row (Wanda's comparison group).

    Each row's k-th smallest score (``kthvalue``, about twice as fast as ``topk`` on CPU) is its
    threshold; rows where ties at the threshold would drop more than k fall back to ``topk``.
    Rows are thresholded in chunks of about ``_ROW_CHUNK`` entries: ``kthvalue`` sorts a copy of
    its input, which for a whole 7B MLP matrix is another 180 MB.
    """
    _check_matrix(scores)
    k = prune_count(scores.shape[1], sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.empty_like(scores, dtype=torch.bool)
    rows = max(1, _ROW_CHUNK // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], rows):
        chunk = scores[start : start + rows]
        torch.gt(chunk, chunk.kthvalue(k, dim=1, keepdim=True).values, out=mask[start : start + rows])
    tied_rows = (mask.sum(dim=1) != scores.shape[1] - k).nonzero().squeeze(1)  # ties dropped more than k
    if tied_rows.numel():
        tied = scores[tied_rows]
        drop = torch.topk(tied, k, dim=1, largest=False).indices
        row_mask = torch.ones_like(tied, dtype=torch.bool)
        row_mask.scatter_(1, drop, False)
        mask[tied_rows] = row_mask
    return mask


def unstructured_per_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the ``floor(numel·s)`` lowest scores of the whole matrix (magnitude pruning's threshold)."""
    _check_matrix(scores)
    k = prune_count(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        drop = torch.topk(scores.reshape(-1), k, largest=False).indices
        mask[drop] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """In every group of M consecutive inputs of a row, drop the N lowest scores."""
    _check_matrix(scores)
    if not pattern.is_nm:
        raise ValueError(f"nm_mask needs an N:M pattern such as 2:4, got pattern={pattern}")
    out_features, in_features = scores.shape
    check_nm_width(in_features, pattern)
    groups = scores.reshape(out_features, in_features // pattern.m, pattern.m)
    drop = torch.topk(groups, pattern.n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, drop, False)
    return mask.view(out_features, in_features)


def build_mask(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool, frozen: torch.Tensor | None = None
) -> torch.Tensor:
    """N:M mask when ``pattern`` is N:M (``sparsity`` is then ignored), else unstructured.

    Args:
        scores: importance ``[out, in]``, higher = keep.
        sparsity: fraction to drop for unstructured patterns.
        pattern: the sparsity pattern.
        per_row: compare within each output row (True) or across the whole matrix (False).
        frozen: entries pruned before (True = stays pruned): they are dropped first and never kept,
            so the mask is monotone across pruning steps; when they outnumber the count to drop,
            all of them are dropped and the mask is sparser than asked.
    """
    if frozen is not None:
        scores = freeze_scores(scores, frozen)
    if pattern.is_nm:
        mask = nm_mask(scores, pattern)
    elif per_row:
        mask = unstructured_per_row_mask(scores, sparsity)
    else:
        mask = unstructured_per_matrix_mask(scores, sparsity)
    return mask if frozen is None else mask & ~frozen


def freeze_scores(scores: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """``scores`` with the frozen (already pruned) entries lowest of all, so a selection drops them first."""
    if frozen.shape != scores.shape:
        raise ValueError(f"frozen mask has shape {tuple(frozen.shape)}, the scores {tuple(scores.shape)}")
    return scores.float().masked_fill(frozen.to(scores.device, torch.bool), float("-inf"))


def nm_violations(weight: torch.Tensor, pattern: Pattern) -> int:
    """Count the groups of M consecutive inputs that hold fewer than N zeros (0 when unstructured)."""
    if not pattern.is_nm:
        return 0
    _check_matrix(weight)
    out_features, in_features = weight.shape
    check_nm_width(in_features, pattern)
    zeros = (weight == 0).reshape(out_features, in_features // pattern.m, pattern.m).sum(dim=2)
    return int((zeros < pattern.n).sum().item())


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of entries equal to zero (for a boolean keep-mask: the fraction dropped)."""
    if tensor.numel() == 0:
        return 0.0
    return float((tensor == 0).sum().item()) / tensor.numel()
