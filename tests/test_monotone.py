"""Monotone pruning: weights pruned by an earlier step stay pruned in the next, for every method.

Iterative schedules prune again after training; SparseGPT's OBS update would otherwise write into
the zeros of the earlier step (the negative control below shows it does).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import BUILDERS, random_ids

from prunelab.io.masks import masks_from_model
from prunelab.prune.engine import prune_model
from prunelab.prune.methods import build_method
from prunelab.prune.methods.base import InputStats
from prunelab.prune.pattern import Pattern


def _stats(in_features: int, needs: frozenset[str]) -> InputStats:
    stats = InputStats(in_features, needs)
    stats.add(torch.randn(256, in_features, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 3, in_features))
    return stats


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "random"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_frozen_entries_stay_pruned(name, pattern):
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    frozen = torch.rand(16, 32) < 0.15
    weight[frozen] = 0.0
    if pattern == "2:4":  # at most two frozen per group of four, as a 2:4 step before would leave
        groups = frozen.view(16, 8, 4)
        groups[..., 2:] = False
        frozen = groups.view(16, 32)
    method = build_method(name)
    result = method.prune(weight.clone(), _stats(32, method.needs), 0.5, Pattern.parse(pattern), frozen=frozen)
    assert not (result.mask & frozen).any(), "a frozen entry was kept"
    assert torch.count_nonzero(result.weight[frozen]) == 0
    assert torch.count_nonzero(result.weight[~result.mask]) == 0
    dropped = int((~result.mask).sum())
    assert dropped == 256, "the count is the step's target when the frozen entries fit in it"


def test_magnitude_with_frozen_entries_equals_a_naive_reference():
    """Drop the frozen entries, then the smallest |W| among the rest until floor(numel * s) are gone."""
    torch.manual_seed(1)
    weight = torch.randn(8, 16)
    frozen = torch.rand(8, 16) < 0.2
    weight[frozen] = 0.0
    result = build_method("magnitude").prune(weight.clone(), None, 0.6, Pattern.parse("unstructured"), frozen=frozen)
    k = int(weight.numel() * 0.6)
    free = [(abs(float(weight.view(-1)[i])), i) for i in range(weight.numel()) if not frozen.view(-1)[i]]
    extra = {i for _, i in sorted(free)[: k - int(frozen.sum())]}
    expected = torch.ones(weight.numel(), dtype=torch.bool)
    expected[frozen.view(-1)] = False
    expected[list(extra)] = False
    assert torch.equal(result.mask.view(-1), expected)


# SparseGPT with blocks of 16 columns: later blocks are updated before their mask is chosen, so an
# earlier zero there can turn non-zero and escape the selection (the tiny matrices are narrower than 128)
METHODS = {"sparsegpt": {"blocksize": 16}, "wanda": {}, "magnitude": {}}


@pytest.mark.parametrize("method_name", list(METHODS))
def test_a_second_pruning_step_never_revives_the_first_steps_zeros(method_name):
    model = BUILDERS["llama"]()
    ids = random_ids(4, 32)
    prune_model(model, build_method(method_name, METHODS[method_name]), ids, 0.3)
    first = masks_from_model(model)
    prune_model(model, build_method(method_name, METHODS[method_name]), ids, 0.6, frozen=first)
    second = masks_from_model(model)
    for name, keep in first.items():
        assert not (second[name] & ~keep).any(), f"{name}: a weight pruned at step 1 is non-zero after step 2"
    total = sum(m.numel() for m in second.values())
    assert sum(int((~m).sum()) for m in second.values()) / total == pytest.approx(0.6, abs=0.01)


def test_without_frozen_masks_sparsegpt_writes_into_earlier_zeros():
    """The negative control: the check above can fail."""
    model = BUILDERS["llama"]()
    ids = random_ids(4, 32)
    prune_model(model, build_method("sparsegpt", METHODS["sparsegpt"]), ids, 0.3)
    first = masks_from_model(model)
    prune_model(model, build_method("sparsegpt", METHODS["sparsegpt"]), ids, 0.6)
    second = masks_from_model(model)
    assert any((second[name] & ~keep).any() for name, keep in first.items())
