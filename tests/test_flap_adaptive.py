"""FLAP's adaptive structures (An et al. 2024; the authors' CASIA-IVA-Lab/FLAP ``lib/prune.py``):
each layer's metric is standardised over that layer, then one threshold over all layers (AL-MM), or
heads and neurons in one ranking weighted by their parameters (AL-AM).

The references below recompute everything with plain loops from activations caught by hooks on
the dense model's real forward: nothing of prunelab's statistics or selection is reused."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import random_ids, tiny_llama

from prunelab.models import surgery
from prunelab.prune.structured import pipeline


def _inputs_of(model, name: str, calib: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, every token's input to the layer's ``name`` module, ``[tokens, in]``, by a forward hook."""
    caught: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = [layer.get_submodule(name).register_forward_hook(
        lambda _m, args, _out, i=i: caught[i].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=calib)
    for handle in handles:
        handle.remove()
    return [torch.cat(parts) for parts in caught]


def _wifv(model, name: str, calib: torch.Tensor, square: bool) -> list[list[float]]:
    """FLAP's WIFV per channel and layer: population variance of the input × squared column norm."""
    out = []
    for layer, x in zip(model.model.layers, _inputs_of(model, name, calib)):
        weight = layer.get_submodule(name).weight.double()
        tokens = x.shape[0]
        row = []
        for j in range(x.shape[1]):
            mean = sum(x[:, j].tolist()) / tokens
            var = sum((v - mean) ** 2 for v in x[:, j].tolist()) / tokens
            score = var * sum(w * w for w in weight[:, j].tolist())
            row.append(score * score if square else score)
        out.append(row)
    return out


def _standardised(values: list[float], width: int = 1) -> list[float]:
    """(v − mean) / std over one layer (std unbiased, as torch.std), then the mean of each run of ``width``."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    z = [(v - mean) / std for v in values]
    return [sum(z[u * width:(u + 1) * width]) / width for u in range(len(values) // width)]


def _lowest(per_layer: list[list[float]], count: int) -> list[list[int]]:
    """The ``count`` lowest values over all layers, passing over a layer's last unit."""
    ranked = sorted((value, layer, unit) for layer, values in enumerate(per_layer) for unit, value in enumerate(values))
    removed: list[list[int]] = [[] for _ in per_layer]
    for _, layer, unit in ranked:
        if sum(map(len, removed)) < count and len(per_layer[layer]) - len(removed[layer]) > 1:
            removed[layer].append(unit)
    return [sorted(r) for r in removed]


def _plan(model, unit: str, calib: torch.Tensor, fraction: float, allocation: str = "global", **kwargs):
    return pipeline.plan_structure(model, unit, "flap", fraction, lambda: calib, allocation, **kwargs)


def test_flap_global_neurons_are_al_mm_per_layer_standardisation_then_one_threshold():
    model, calib = tiny_llama(num_hidden_layers=4), random_ids(4, 16)
    scores = [_standardised(row) for row in _wifv(model, "mlp.down_proj", calib, square=False)]
    want = _lowest(scores, round(0.3 * 4 * 128))
    stats = pipeline.channel_stats(model, calib, "neurons")
    got = pipeline.plan_units(model, "neurons", "flap", 0.3, pipeline.unit_scores(model, "neurons", "flap", stats=stats),
                              allocation="global", stats=stats)
    assert got.removed == want
    assert len({len(r) for r in want}) > 1  # widths do differ per layer


def test_flap_global_heads_without_gqa_standardise_squared_channels_then_average_per_head():
    model, calib = tiny_llama(num_hidden_layers=4, num_key_value_heads=4), random_ids(4, 16)
    channels = _wifv(model, "self_attn.o_proj", calib, square=True)  # the authors square the attention metric
    scores = [_standardised(row, width=16) for row in channels]  # head_dim 16
    want = _lowest(scores, round(0.25 * 4 * 4))
    stats = pipeline.channel_stats(model, calib, "heads")
    got = pipeline.plan_units(model, "heads", "flap", 0.25, pipeline.unit_scores(model, "heads", "flap", stats=stats),
                              allocation="global", stats=stats)
    assert got.removed == want


def test_flap_global_heads_with_gqa_take_one_head_of_every_group_at_a_time():
    model, calib = tiny_llama(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2), random_ids(4, 16)
    heads = [_standardised(row, width=8) for row in _wifv(model, "self_attn.o_proj", calib, square=True)]
    # slice r of a layer: the r-th weakest head of each of its 2 groups of 4, scored by their mean
    slices = [[(sorted(h[:4])[r] + sorted(h[4:])[r]) / 2 for r in range(4)] for h in heads]
    taken = [len(r) for r in _lowest(slices, round(0.3 * 4 * 4))]
    want = [sorted(sorted(range(4), key=h.__getitem__)[:k] + [4 + i for i in sorted(range(4), key=h[4:].__getitem__)[:k]])
            for h, k in zip(heads, taken)]
    plan = _plan(model, "heads", calib, 0.3)
    assert plan.removed == want and len(set(taken)) > 1
    standard = pipeline.apply_plan(model, plan)
    assert not standard and [w["heads"] for w in surgery.layer_widths(model)] == [8 - 2 * k for k in taken]


def test_flap_global_whole_kv_groups_rank_by_their_heads_mean():
    model, calib = tiny_llama(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4), random_ids(4, 16)
    heads = [_standardised(row, width=8) for row in _wifv(model, "self_attn.o_proj", calib, square=True)]
    groups = [[(h[2 * g] + h[2 * g + 1]) / 2 for g in range(4)] for h in heads]  # 4 groups of 2 query heads
    want = [sorted(h for g in r for h in (2 * g, 2 * g + 1)) for r in _lowest(groups, round(0.3 * 4 * 4))]
    plan = _plan(model, "heads", calib, 0.3, heads="groups")
    assert plan.removed == want
    pipeline.apply_plan(model, plan)
    assert [w["kv_heads"] for w in surgery.layer_widths(model)] == [4 - len(r) // 2 for r in want]


def test_scaling_one_layers_scores_by_1000_does_not_change_how_many_units_it_loses():
    """Per-layer standardisation is blind to a layer's scale; a raw ranking over layers would take every
    unit it may from the other layers and none from the scaled one."""
    model, calib = tiny_llama(num_hidden_layers=4), random_ids(4, 16)
    stats = pipeline.channel_stats(model, calib, "neurons")

    def removed_per_layer(score: str, scores: list[torch.Tensor]) -> list[int]:
        return [len(r) for r in pipeline.plan_units(model, "neurons", score, 0.3, scores, "global", stats=stats).removed]

    scores = {score: pipeline.unit_scores(model, "neurons", score, stats=stats) for score in ("flap", "wanda", "magnitude")}
    before = {score: removed_per_layer(score, s) for score, s in scores.items()}
    assert all(counts[2] > 0 for counts in before.values())
    stats[2].total.mul_(1000 ** 0.5)  # layer 2's inputs x sqrt(1000): its variance, so its FLAP scores, x 1000
    stats[2].sq_norm.mul_(1000)
    scaled = pipeline.unit_scores(model, "neurons", "flap", stats=stats)
    torch.testing.assert_close(scaled[2], scores["flap"][2] * 1000, rtol=1e-4, atol=0)
    assert removed_per_layer("flap", scaled) == before["flap"]
    for score in ("wanda", "magnitude"):  # their unit scores ranked as given
        assert removed_per_layer(score, [s * (1000 if i == 2 else 1) for i, s in enumerate(scores[score])]) == before[score]


def test_al_am_ranks_heads_and_neurons_together_by_their_parameters():
    model, calib = tiny_llama(num_hidden_layers=4, num_key_value_heads=4), random_ids(4, 16)
    heads = [_standardised(row, width=16) for row in _wifv(model, "self_attn.o_proj", calib, square=True)]
    neurons = [_standardised(row) for row in _wifv(model, "mlp.down_proj", calib, square=False)]
    d = 64
    head_cost, neuron_cost = 4 * 16 * d, 3 * d  # a head's q, k, v rows and o columns; gate, up rows and down column
    total = 4 * (4 * head_cost + 128 * neuron_cost)
    ranked = sorted([(v, "heads", layer, u) for layer, row in enumerate(heads) for u, v in enumerate(row)]
                    + [(v, "neurons", layer, u) for layer, row in enumerate(neurons) for u, v in enumerate(row)])
    want = {"heads": [[] for _ in range(4)], "neurons": [[] for _ in range(4)]}
    removed = 0.0
    for _, kind, layer, unit in ranked:  # lowest first while the removed parameters get closer to 30%
        cost = head_cost if kind == "heads" else neuron_cost
        if abs(removed + cost - 0.3 * total) >= abs(removed - 0.3 * total):
            break
        want[kind][layer].append(unit)
        removed += cost
    want = {kind: [sorted(r) for r in rows] for kind, rows in want.items()}
    plan = _plan(model, "heads_neurons", calib, 0.3)
    assert plan.removed == want and any(want["heads"]) and any(want["neurons"])
    params = sum(p.numel() for p in model.parameters())
    pipeline.apply_plan(model, plan)
    biases = d * sum(len(part.compensation) for part in plan.parts)  # FLAP's compensation: new o / down biases
    assert params - sum(p.numel() for p in model.parameters()) + biases == removed


def test_al_am_on_gqa_shrinks_heads_and_neurons_per_layer_and_reloads(tmp_path):
    from prunelab.models.loading import load_shrunk

    model, calib = tiny_llama(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2), random_ids(4, 16)
    plan = _plan(model, "heads_neurons", calib, 0.6)
    assert pipeline.apply_plan(model, plan) is False
    widths = surgery.layer_widths(model)
    assert len({w["heads"] for w in widths}) > 1 and len({w["mlp"] for w in widths}) > 1
    assert all(w["kv_heads"] == 2 and w["heads"] >= 2 for w in widths)  # per_group: every group keeps a head
    with torch.no_grad():
        expected = model(input_ids=calib).logits
    model.save_pretrained(tmp_path)
    reloaded = load_shrunk(tmp_path).eval()
    assert surgery.layer_widths(reloaded) == widths
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=calib).logits, expected)


@pytest.mark.parametrize("heads", ["per_group", "groups"])
def test_uniform_heads_and_neurons_take_the_same_share_of_each_kind_in_every_layer(heads):
    model, calib = tiny_llama(num_hidden_layers=4), random_ids(4, 16)
    plan = _plan(model, "heads_neurons", calib, 0.5, allocation="uniform", heads=heads)
    assert [len(r) for r in plan.removed["neurons"]] == [64] * 4
    assert [len(r) for r in plan.removed["heads"]] == [2] * 4  # one head of each of 2 groups, or one whole group
