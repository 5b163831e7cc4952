"""Mask builders against naive Python selections on small matrices."""

from __future__ import annotations

import pytest
import torch

from prunelab.prune.masks import (
    build_mask,
    nm_mask,
    nm_violations,
    prune_count,
    sparsity_of,
    unstructured_per_matrix_mask,
    unstructured_per_row_mask,
)
from prunelab.prune.pattern import Pattern


def naive_row_drop(scores: torch.Tensor, sparsity: float) -> list[set[int]]:
    """Per row, the indices of the int(in·s) smallest scores, by a Python sort."""
    k = int(scores.shape[1] * sparsity)
    return [set(sorted(range(len(row)), key=lambda j: row[j])[:k]) for row in scores.tolist()]


@pytest.mark.parametrize("shape,sparsity", [((5, 16), 0.5), ((3, 10), 0.3), ((7, 33), 0.75), ((4, 8), 0.0)])
def test_per_row_mask_drops_the_smallest_of_each_row(shape, sparsity):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = unstructured_per_row_mask(scores, sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    for row_mask, expected in zip(mask.tolist(), naive_row_drop(scores, sparsity)):
        dropped = {j for j, keep in enumerate(row_mask) if not keep}
        assert dropped == expected
        assert len(dropped) == int(shape[1] * sparsity)


def test_per_row_mask_in_row_chunks_equals_the_naive_selection(monkeypatch):
    import prunelab.prune.masks as masks

    monkeypatch.setattr(masks, "_ROW_CHUNK", 40)  # 2 rows of 17 per kthvalue call: 9 chunks, the last of 1 row
    scores = torch.randn(17, 17, generator=torch.Generator().manual_seed(5))
    scores[4, :] = 0.25  # a tied row inside a chunk
    mask = unstructured_per_row_mask(scores, 0.6)
    for i, (row_mask, expected) in enumerate(zip(mask.tolist(), naive_row_drop(scores, 0.6))):
        dropped = {j for j, keep in enumerate(row_mask) if not keep}
        assert len(dropped) == 10
        if i != 4:
            assert dropped == expected


def test_per_row_mask_keeps_exact_counts_when_scores_tie_at_the_threshold():
    # dead inputs give whole columns of zero scores: ties straddle the threshold in every row
    scores = torch.rand(6, 20, generator=torch.Generator().manual_seed(3)) + 1.0
    scores[:, [2, 5, 7, 11, 13, 17]] = 0.0
    scores[0, :] = 0.5  # a row where every score ties
    mask = unstructured_per_row_mask(scores, 0.25)  # k = 5 of 6 (or 20) tied scores
    for row, row_mask in zip(scores.tolist(), mask.tolist()):
        dropped = [v for v, keep in zip(row, row_mask) if not keep]
        kept = [v for v, keep in zip(row, row_mask) if keep]
        assert len(dropped) == 5
        assert max(dropped) <= min(kept), "no kept score may be below a dropped one"


def test_per_matrix_mask_uses_one_threshold():
    scores = torch.rand(6, 12, generator=torch.Generator().manual_seed(1))
    mask = unstructured_per_matrix_mask(scores, 0.4)
    flat = scores.flatten().tolist()
    k = int(len(flat) * 0.4)
    expected = set(sorted(range(len(flat)), key=lambda i: flat[i])[:k])
    dropped = {i for i, keep in enumerate(mask.flatten().tolist()) if not keep}
    assert dropped == expected
    # per-matrix differs from per-row on a matrix whose rows have different scales
    scaled = scores * torch.arange(1, 7).unsqueeze(1)
    row_counts = (~unstructured_per_matrix_mask(scaled, 0.5)).sum(dim=1)
    assert row_counts[0] > row_counts[-1]


def test_prune_count_is_exact_despite_float_rounding():
    assert int(100 * 0.57) == 56  # the float trap the helper avoids
    assert prune_count(100, 0.57) == 57
    assert prune_count(10, 0.7) == 7
    assert prune_count(64, 0.6) == 38
    assert prune_count(10, 1.0) == 10  # a global threshold may empty a module
    with pytest.raises(ValueError, match="sparsity"):
        prune_count(10, 1.5)


def naive_nm_ok(weight: torch.Tensor, n: int, m: int) -> int:
    """Count groups of m consecutive inputs with fewer than n zeros, by Python loops."""
    bad = 0
    for row in weight.tolist():
        for start in range(0, len(row), m):
            if sum(1 for x in row[start : start + m] if x == 0) < n:
                bad += 1
    return bad


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nm_mask_drops_the_n_smallest_of_every_group(pattern, seed):
    p = Pattern.parse(pattern)
    gen = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 9, (1,), generator=gen))
    groups = int(torch.randint(1, 7, (1,), generator=gen))
    scores = torch.randn(rows, groups * p.m, generator=gen)
    mask = nm_mask(scores, p)
    weight = torch.where(mask, scores, torch.zeros_like(scores))
    assert naive_nm_ok(weight, p.n, p.m) == 0
    for r, row in enumerate(scores.tolist()):
        for start in range(0, len(row), p.m):
            group = row[start : start + p.m]
            expected = {start + j for j in sorted(range(p.m), key=lambda j: group[j])[: p.n]}
            dropped = {start + j for j in range(p.m) if not mask[r, start + j]}
            assert dropped == expected
    assert sparsity_of(mask) == pytest.approx(p.n / p.m)


@pytest.mark.parametrize("width,pattern", [(10, "2:4"), (12, "4:8"), (6, "1:4")])
def test_nm_rejects_widths_not_divisible_by_m(width, pattern):
    p = Pattern.parse(pattern)
    with pytest.raises(ValueError) as info:
        nm_mask(torch.rand(3, width), p)
    assert str(width) in str(info.value) and pattern in str(info.value)
    with pytest.raises(ValueError, match=str(width)):
        nm_violations(torch.rand(3, width), p)


def test_nm_violations_counts_groups_with_too_few_zeros():
    p = Pattern.parse("2:4")
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 16, generator=gen)
    # zero out random positions, then compare with the naive loop
    weight[torch.rand(6, 16, generator=gen) < 0.5] = 0
    assert nm_violations(weight, p) == naive_nm_ok(weight, 2, 4)
    ok = weight * nm_mask(weight.abs(), p)
    assert nm_violations(ok, p) == 0
    assert nm_violations(torch.ones(2, 8), p) == 4
    assert nm_violations(torch.ones(2, 8), Pattern()) == 0


def test_sparsity_of():
    assert sparsity_of(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5
    assert sparsity_of(torch.tensor([True, False, False, False])) == 0.75
    assert sparsity_of(torch.zeros(0)) == 0.0


def test_build_mask_dispatch_and_errors():
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(build_mask(scores, 0.9, Pattern.parse("2:4"), per_row=True), nm_mask(scores, Pattern(2, 4)))
    assert torch.equal(build_mask(scores, 0.5, Pattern(), per_row=True), unstructured_per_row_mask(scores, 0.5))
    assert torch.equal(build_mask(scores, 0.5, Pattern(), per_row=False), unstructured_per_matrix_mask(scores, 0.5))
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_per_row_mask(scores, 1.2)
    with pytest.raises(ValueError, match="out_features, in_features"):
        unstructured_per_row_mask(torch.rand(8), 0.5)
