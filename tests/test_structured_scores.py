"""Structured importance scores against hand computations and naive loops on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.prune.structured import block_influence, flap, magnitude, taylor, wanda_sp
from prunelab.prune.structured.units import per_unit

g = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=g)


def test_per_unit_sums_consecutive_channels():
    assert per_unit(torch.arange(6.0), 2).tolist() == [1.0, 5.0, 9.0]
    with pytest.raises(ValueError):
        per_unit(torch.arange(5.0), 2)


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_of_a_neuron_is_the_norm_of_its_rows_and_column(p):
    gate, up, down = _rand(6, 4), _rand(6, 4), _rand(4, 6)
    got = magnitude.unit_scores([gate, up], [down], width=1, p=p)
    for i in range(6):
        values = torch.cat([gate[i], up[i], down[:, i]])
        want = values.abs().sum() if p == 1 else values.pow(2).sum().sqrt()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)


def test_magnitude_of_a_head_spans_its_q_rows_and_o_columns():
    head_dim, heads, hidden = 3, 4, 5
    q, o = _rand(heads * head_dim, hidden), _rand(hidden, heads * head_dim)
    got = magnitude.unit_scores([q], [o], width=head_dim, p=2)
    for h in range(heads):
        block = slice(h * head_dim, (h + 1) * head_dim)
        want = (q[block].pow(2).sum() + o[:, block].pow(2).sum()).sqrt()
        assert got[h].item() == pytest.approx(want.item(), rel=1e-5)


def test_wanda_sp_sums_abs_weight_times_input_norm_over_a_units_channels():
    w, x = _rand(5, 8), _rand(30, 8)
    got = wanda_sp.unit_scores(w, x.pow(2).sum(0), width=2)
    for unit in range(4):
        want = sum(abs(w[i, j].item()) * x[:, j].norm().item() for i in range(5) for j in (2 * unit, 2 * unit + 1))
        assert got[unit].item() == pytest.approx(want, rel=1e-5)


def test_flap_moments_and_fluctuation_scores():
    x, w = _rand(50, 6) + 2.0, _rand(4, 6)
    mean, var = flap.channel_moments(x.sum(0), x.pow(2).sum(0), 50)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    got = flap.channel_scores(w, var)
    for j in range(6):
        assert got[j].item() == pytest.approx(x[:, j].var(unbiased=False).item() * w[:, j].pow(2).sum().item(), rel=1e-4)


def test_flap_bias_compensation_keeps_the_mean_output_on_the_calibration_set():
    x, w, b = _rand(200, 8) + 1.0, _rand(5, 8), _rand(5)
    mean, _ = flap.channel_moments(x.sum(0), x.pow(2).sum(0), 200)
    removed = torch.tensor([1, 4, 6])
    kept = torch.tensor([0, 2, 3, 5, 7])
    dense_mean = (x @ w.t() + b).mean(0)
    pruned_mean = (x[:, kept] @ w[:, kept].t() + b + flap.bias_compensation(w, mean, removed)).mean(0)
    torch.testing.assert_close(pruned_mean, dense_mean, rtol=1e-4, atol=1e-4)
    without = (x[:, kept] @ w[:, kept].t() + b).mean(0)
    assert (without - dense_mean).abs().max() > 0.1  # the compensation is what closes the gap


def test_standardisation_is_per_layer_then_a_heads_mean_over_its_channels():
    from prunelab.prune.structured import select

    values = [1.0, 2.0, 4.0, 9.0]  # one layer's channels; two units of two channels
    mean = sum(values) / 4
    std = (sum((v - mean) ** 2 for v in values) / 3) ** 0.5  # unbiased, as the authors' torch.std
    z = [(v - mean) / std for v in values]
    got = select.standardize(torch.tensor(values), width=2)
    assert got.tolist() == pytest.approx([(z[0] + z[1]) / 2, (z[2] + z[3]) / 2], rel=1e-6)
    assert select.standardize(torch.tensor([3.0, 3.0, 3.0])).tolist() == [0.0, 0.0, 0.0]  # no spread: no NaN


def test_flap_scores_a_head_by_its_squared_channel_metric():
    x, w = _rand(40, 6) + 1.0, _rand(3, 6)
    var = x.var(0, unbiased=False)
    got = flap.unit_scores(w, var, width=3, unit="heads")
    for head in range(2):
        want = sum((var[j].item() * w[:, j].pow(2).sum().item()) ** 2 for j in range(3 * head, 3 * head + 3))
        assert got[head].item() == pytest.approx(want, rel=1e-5)
    neurons = flap.unit_scores(w, var, width=1)  # a neuron is one channel, not squared
    assert neurons.tolist() == pytest.approx([var[j].item() * w[:, j].pow(2).sum().item() for j in range(6)], rel=1e-5)


def test_taylor_is_abs_weight_times_gradient_summed_over_the_unit_with_real_autograd():
    gate = torch.nn.Parameter(_rand(4, 3))
    down = torch.nn.Parameter(_rand(3, 4))
    x = _rand(7, 3)
    loss = (torch.nn.functional.silu(x @ gate.t()) @ down.t()).pow(2).mean()
    loss.backward()
    got = taylor.unit_scores([(gate.detach(), gate.grad)], [(down.detach(), down.grad)], width=1)
    for i in range(4):
        want = (gate[i] * gate.grad[i]).abs().sum() + (down[:, i] * down.grad[:, i]).abs().sum()
        assert got[i].item() == pytest.approx(want.item(), rel=1e-5)


def test_block_influence_and_angular_distance_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert block_influence.block_influence(x, 3 * x) == pytest.approx(0.0, abs=1e-12)  # same direction
    turned = torch.tensor([[0.0, 1.0], [-2.0, 0.0]])  # each token turned by 90°
    assert block_influence.block_influence(x, turned) == pytest.approx(1.0)
    assert block_influence.angular_distance(x, turned) == pytest.approx(0.5)
    assert block_influence.angular_distance(x, -x) == pytest.approx(1.0)
    half = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # 45° then 0°: mean cos = (√2/2 + 1) / 2
    assert block_influence.block_influence(x, half) == pytest.approx(1 - (math.sqrt(0.5) + 1) / 2)


def test_the_block_that_turns_the_hidden_state_least_is_chosen():
    h0 = torch.tensor([[1.0, 0.0]])
    states = [h0, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.1, 1.0]]), torch.tensor([[0.2, 1.0]]),
              torch.tensor([[-1.0, 0.0]])]
    start, distances = block_influence.best_block(states, 2)
    assert start == 1 and len(distances) == 3
    with pytest.raises(ValueError):
        block_influence.best_block(states, 5)


def test_input_stats_give_flaps_mean_and_variance_over_batches():
    from prunelab.prune.stats import SQ_NORM, SUM, InputStats

    x = _rand(3, 40, 6) * 3 + 5  # three batches of 40 tokens
    stats = InputStats(6, frozenset({SUM, SQ_NORM}))
    for batch in x:
        stats.add(batch)
    mean, var = flap.channel_moments(stats.total, stats.sq_norm, stats.ntokens)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(mean, flat.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, flat.var(0, unbiased=False), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("block", [1, 2])
def test_layer_scores_from_the_conveyor_equal_hooks_on_the_real_forward(block):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunelab.prune.structured.collect import layer_scores

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (3, 12), generator=g)
    states: dict[int, list] = {}
    hooks = [layer.register_forward_hook(
        lambda module, args, out, i=i: states.setdefault(i, []).append(
            (args[0] if args else None, out[0] if isinstance(out, tuple) else out)), with_kwargs=False)
        for i, layer in enumerate(model.model.layers)]
    inputs: dict[int, list] = {}
    pre = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: inputs.setdefault(i, []).append(
            args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks + pre:
        h.remove()
    x = [inputs[i][0] for i in range(4)] + [states[3][0][1]]
    got = layer_scores(model, ids, block=block)
    want_bi = [block_influence.block_influence(x[i], x[i + 1]) for i in range(4)]
    want_ad = [block_influence.angular_distance(x[i], x[i + block]) for i in range(4 - block + 1)]
    assert got["block_influence"] == pytest.approx(want_bi, abs=1e-5)
    assert got["angular_distance"] == pytest.approx(want_ad, abs=1e-5)


def test_uniform_selection_takes_the_same_number_of_lowest_units_per_layer():
    from prunelab.prune.structured import select

    scores = [torch.tensor([5.0, 1.0, 3.0, 2.0]), torch.tensor([0.0, 9.0, 8.0, 7.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    assert select.uniform(scores, 0.5) == [[1, 3], [0, 3], [0, 1]]
    assert select.uniform(scores, 0.5, protect=[0, 2]) == [[], [0, 3], []]


def test_global_ranking_takes_the_lowest_everywhere_but_keeps_every_layer_alive():
    from prunelab.prune.structured import select

    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0, 0.15])]
    assert select.global_ranking(scores, 0.5) == [[0, 1], [2]]  # layer 0 keeps its one unit (min_keep=1)
    assert select.global_ranking(scores, 0.3, min_keep=2) == [[0], [2]]
    with pytest.raises(ValueError, match="keeps 2"):
        select.global_ranking(scores, 0.5, min_keep=2)  # a third unit would leave a layer with one


def test_a_budget_over_two_kinds_stops_closest_to_the_share_of_parameters():
    from prunelab.prune.structured import select

    heads = [torch.tensor([0.0, 3.0]), torch.tensor([1.5, 2.5])]  # cost 10 each
    neurons = [torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0.2, 5.0, 6.0, 7.0])]  # cost 1 each
    # total 4 x 10 + 8 x 1 = 48; 25% = 12. Lowest first: h(0,0) 10, n(1,0) 11, n(0,0) 12 -> exactly 12, then
    # n(0,1) would make 13, farther than 12: stop.
    got = select.global_budget([heads, neurons], [[10, 10], [1, 1]], 0.25)
    assert got == [[[0], []], [[0], [0]]]
    # 40% = 19.2: ... 12, n(0,1) 13, h(1,0) 23 is farther from 19.2 than 13 is? |23-19.2|=3.8 < |13-19.2|=6.2: taken
    assert select.global_budget([heads, neurons], [[10, 10], [1, 1]], 0.4) == [[[0], [0]], [[0, 1], [0]]]


def test_gqa_head_selection_respects_the_groups():
    from prunelab.prune.structured import select

    scores = torch.tensor([3.0, 1.0, 2.0, 9.0, 0.5, 8.0])  # 3 groups of 2: (3,1) (2,9) (0.5,8)
    assert select.heads_in_groups(scores, 3, 1) == [1, 2, 4]
    assert select.whole_groups(scores, 3, 1) == [0, 1]  # group sums 4, 11, 8.5
    with pytest.raises(ValueError):
        select.heads_in_groups(scores, 3, 2)
