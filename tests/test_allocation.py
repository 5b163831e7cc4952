"""Per-layer allocation against naive computations and the properties OWL promises."""

from __future__ import annotations

import pytest
import torch

from prunelab.prune.allocation import explicit, global_magnitude, outlier_ratio, owl, uniform
from prunelab.prune.masks import unstructured_per_matrix_mask


def test_uniform():
    assert uniform(3, 0.5) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="sparsity"):
        uniform(3, 1.0)
    with pytest.raises(ValueError, match="num_layers"):
        uniform(0, 0.5)


def test_outlier_ratio_pools_the_layers_modules():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(4, 6, generator=gen) ** 4, torch.rand(3, 5, generator=gen) * 0.2]
    values = [v for s in scores for v in s.flatten().tolist()]
    mean = sum(values) / len(values)
    for m in (1.0, 2.0, 3.0):
        expected = sum(1 for v in values if v > m * mean) / len(values)
        assert outlier_ratio(scores, m) == pytest.approx(expected)
    # pooling differs from averaging the per-module ratios
    per_module = sum(outlier_ratio([s], 2.0) for s in scores) / 2
    assert outlier_ratio(scores, 2.0) != pytest.approx(per_module)
    with pytest.raises(ValueError):
        outlier_ratio([], 5.0)


def test_owl_mean_range_and_order():
    ratios = [0.010, 0.030, 0.002, 0.020, 0.015]
    targets = owl(ratios, 0.6, 0.08)
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    assert max(targets) - min(targets) == pytest.approx(0.16)
    # more outliers -> lower sparsity: the orders are exactly reversed
    by_ratio = sorted(range(len(ratios)), key=lambda i: ratios[i])
    by_target = sorted(range(len(ratios)), key=lambda i: targets[i], reverse=True)
    assert by_ratio == by_target
    # affine in the ratios: the middle of the ratio range sits at the middle of the target range
    lo, hi = min(ratios), max(ratios)
    for r, t in zip(ratios, targets):
        assert t == pytest.approx(max(targets) - (r - lo) / (hi - lo) * 0.16)


def test_owl_edge_cases():
    assert owl([0.1, 0.1, 0.1], 0.5, 0.08) == [0.5, 0.5, 0.5]
    assert owl([0.1, 0.3], 0.5, 0.0) == [0.5, 0.5]
    with pytest.raises(ValueError, match="lower allocation.lam"):
        owl([0.0, 0.0, 0.0, 1.0], 0.1, 0.2)  # the outlier-rich layer would need sparsity -0.2
    with pytest.raises(ValueError, match="lam"):
        owl([0.1, 0.2], 0.5, 1.5)


def test_explicit_parses_ranges_and_singles():
    targets = explicit({"0-2": 0.3, "4": 0.7, 6: 0.1, " 8 - 9 ": 0.9}, 10, 0.5)
    assert targets == [0.3, 0.3, 0.3, 0.5, 0.7, 0.5, 0.1, 0.5, 0.9, 0.9]
    assert explicit({}, 3, 0.4) == [0.4, 0.4, 0.4]


@pytest.mark.parametrize(
    "layers,match",
    [
        ({"0-5": 0.3, "5-7": 0.6}, "both set layer 5"),
        ({"0-10": 0.3}, "layer 10.*10 layers"),
        ({"12": 0.3}, "layer 12"),
        ({"5-2": 0.3}, "backwards"),
        ({"a-b": 0.3}, "not understood"),
        ({"1,2": 0.3}, "not understood"),
        ({"1": 1.2}, r"allocation.layers\['1'\]"),
    ],
)
def test_explicit_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        explicit(layers, 10, 0.5)


def naive_global(weights: dict[str, torch.Tensor], sparsity: float) -> tuple[float, dict[str, int]]:
    values = sorted(abs(v) for w in weights.values() for v in w.flatten().tolist())
    k = int(len(values) * sparsity)
    threshold = values[k - 1]
    return threshold, {name: sum(1 for v in w.flatten().tolist() if abs(v) <= threshold) for name, w in weights.items()}


@pytest.mark.parametrize("chunk", [1 << 24, 7])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_global_magnitude_equals_concatenate_and_sort(chunk, sparsity):
    gen = torch.Generator().manual_seed(1)
    weights = {
        "q": torch.randn(8, 16, generator=gen) * 0.5,
        "k": torch.randn(4, 16, generator=gen) * 2.0,
        "down": torch.randn(16, 24, generator=gen),
    }
    result = global_magnitude(weights, sparsity, chunk=chunk)
    _, counts = naive_global(weights, sparsity)
    for name, w in weights.items():
        assert result[name] == pytest.approx(counts[name] / w.numel())
    assert result["q"] > result["down"] > result["k"]  # smaller |W| scale, pruned more
    # the per-matrix threshold at each module's share reproduces the global selection
    total_dropped = 0
    for name, w in weights.items():
        mask = unstructured_per_matrix_mask(w.abs(), result[name])
        total_dropped += int((~mask).sum())
    assert total_dropped == int(sum(w.numel() for w in weights.values()) * sparsity)


def test_global_magnitude_handles_ties_and_low_precision():
    weights = {
        "a": torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.bfloat16),
        "b": torch.tensor([[0.5, 0.5, 2.0, -0.25]], dtype=torch.bfloat16),
    }
    result = global_magnitude(weights, 0.5)  # k = 4: the -0.25 plus three of the six 0.5s
    assert result["a"] * 4 + result["b"] * 4 == pytest.approx(4)
    assert result["b"] >= 0.25 and result["b"] <= 0.75  # -0.25 always, at most both 0.5s
    assert global_magnitude(weights, 0.0) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="sparsity"):
        global_magnitude(weights, 1.0)
