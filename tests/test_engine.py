"""Layer-wise engine, capture, sparsity report and mask I/O on tiny random models.

References are computed independently: the model's own forward (``output_hidden_states``,
hooks on the real layers), statistics accumulated by hand, zero counts read off the weights.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from prunelab.models.adapters import get_adapter, select_modules
from prunelab.prune.capture import capture_layer_inputs, run_layer
from prunelab.prune.engine import check_pattern_fits, layerwise_forward, prune_model
from prunelab.io.masks import (
    apply_masks,
    load_masks,
    load_pruned_weights,
    masks_from_model,
    save_masks,
    save_pruned_weights,
)
from prunelab.prune.methods import build_method
from prunelab.prune.methods.base import HESSIAN, SQ_NORM, InputStats, PruneResult, PruningMethod
from prunelab.prune.pattern import Pattern
from prunelab.prune.summary import check_nm, measure_sparsity
from tiny_models import BUILDERS, random_ids

CPU = {"device": "cpu"}
ARCHS = sorted(BUILDERS)


# ----------------------------------------------------------------------------- helpers
class KeepAll(PruningMethod):
    """Prunes nothing; records the statistics it is given, in call order."""

    name = "keep_all"
    needs = frozenset({SQ_NORM, HESSIAN})

    def __init__(self):
        super().__init__()
        self.seen: list[InputStats] = []

    def prune(self, weight, stats, sparsity, pattern):
        self.seen.append(stats)
        return PruneResult(weight=weight.clone(), mask=torch.ones_like(weight, dtype=torch.bool))


class HalfByMagnitude(KeepAll):
    """Zeroes the smallest half of |W| per matrix (its own code) and records the stats it gets."""

    name = "half_by_magnitude"

    def prune(self, weight, stats, sparsity, pattern):
        self.seen.append(InputStats.__new__(InputStats))
        self.seen[-1].__dict__.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in stats.__dict__.items()})
        flat = weight.abs().flatten()
        keep = (weight.abs() > flat.kthvalue(flat.numel() // 2).values).reshape(weight.shape)
        return PruneResult(weight=weight * keep, mask=keep)


def reference_stats(model: nn.Module, ids: torch.Tensor, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Σx², ΣxxT and token count per prunable module of ``layer``, from the model's own forward."""
    sums: dict[str, list] = {}
    handles = []
    for m in get_adapter(model).prunable_modules(layer):
        sums[m.name] = [torch.zeros(m.in_features, dtype=torch.float64), torch.zeros(m.in_features, m.in_features, dtype=torch.float64), 0]

        def hook(_mod, args, name=m.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name][0] += (x * x).sum(0)
            sums[name][1] += x.t() @ x
            sums[name][2] += x.shape[0]

        handles.append(m.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    return {k: tuple(v) for k, v in sums.items()}


def assert_same_structure(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_structure(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def zero_fraction(model: nn.Module) -> dict[str, float]:
    """Zero fraction of every Linear/Conv1D weight inside the decoder layers, read directly."""
    return {m.full_name: float((m.module.weight == 0).float().mean()) for m in get_adapter(model).iter_prunable()}


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ----------------------------------------------------------------------------- capture
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_records_what_each_real_layer_receives(arch):
    model = BUILDERS[arch]()
    ids = random_ids(nsamples=5, seqlen=16)
    adapter = get_adapter(model)
    batches = ids.split(2)  # shapes 2, 2, 1: two distinct shapes
    captured = capture_layer_inputs(adapter, batches, torch.device("cpu"))

    # reference: the arguments every real layer gets in the model's own forward, batch by batch
    received = [[] for _ in range(adapter.num_layers)]
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: received[i].append((args, kwargs)), with_kwargs=True
        )
        for i, layer in enumerate(adapter.layers)
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch, use_cache=False)
    for h in handles:
        h.remove()

    assert captured.num_batches == 3
    for b in range(3):
        assert torch.equal(captured.hidden[b], received[0][b][0][0])
        for i in range(adapter.num_layers):
            args, kwargs = received[i][b]
            call = captured.calls[i][b]
            assert_same_structure(call.args, tuple(args[1:]), f"layer {i} batch {b} args")
            assert_same_structure(call.kwargs, kwargs, f"layer {i} batch {b} kwargs")


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_replay_equals_model_hidden_states(arch):
    model = BUILDERS[arch]()
    ids = random_ids(nsamples=3, seqlen=16)
    adapter = get_adapter(model)
    last_out = []
    handle = adapter.layers[-1].register_forward_hook(lambda _m, _a, out: last_out.append(out))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False)
    handle.remove()
    captured = capture_layer_inputs(adapter, [ids], torch.device("cpu"))
    hidden = captured.hidden[0]
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers):
            torch.testing.assert_close(hidden, ref.hidden_states[i], rtol=1e-5, atol=1e-5)
            hidden = run_layer(layer, hidden, captured.calls[i][0])
    torch.testing.assert_close(hidden, last_out[0], rtol=1e-5, atol=1e-5)
    out = layerwise_forward(model, ids, {"device": "cpu", "batch_size": 2})
    torch.testing.assert_close(torch.cat(out), last_out[0], rtol=1e-5, atol=1e-5)


def test_gemma3_layers_get_their_own_masks():
    """Sliding (window 4) and full attention layers must not be replayed with one another's mask."""
    model = BUILDERS["gemma3"]()
    ids = random_ids(nsamples=1, seqlen=16)
    adapter = get_adapter(model)
    captured = capture_layer_inputs(adapter, [ids], torch.device("cpu"))
    sliding, full = captured.calls[0][0].kwargs, captured.calls[1][0].kwargs
    assert torch.is_tensor(sliding["attention_mask"])  # sdpa: the full-attention layer may get None (causal)
    assert full["attention_mask"] is None or not torch.equal(sliding["attention_mask"], full["attention_mask"])
    with torch.no_grad():
        right = run_layer(adapter.layers[1], captured.hidden[0], captured.calls[1][0])
        wrong = run_layer(adapter.layers[1], captured.hidden[0], captured.calls[0][0])
    assert not torch.allclose(right, wrong, atol=1e-4)


# ----------------------------------------------------------------------------- engine
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sequential", [True, False])
def test_method_that_prunes_nothing_leaves_model_unchanged(arch, sequential):
    model = BUILDERS[arch]()
    ids = random_ids(nsamples=3, seqlen=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids).logits
    method = KeepAll()
    report = prune_model(model, method, ids, 0.5, "unstructured", None, {**CPU, "sequential": sequential, "batch_size": 2})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(method.seen) == len(report.modules) == len(list(get_adapter(model).iter_prunable()))
    assert all(s.ntokens == 3 * 16 for s in method.seen)
    num_layers = get_adapter(model).num_layers
    # statistics pass on every layer; sequential re-runs every pruned layer but the last
    assert report.layer_forwards == (2 * num_layers - 1 if sequential else num_layers)
    assert not model.training


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_sequential_feeds_pruned_inputs_to_the_next_layer(arch):
    dense = BUILDERS[arch]()
    ids = random_ids(nsamples=3, seqlen=16)
    names = [m.name for m in get_adapter(dense).prunable_modules(1)]
    n0 = len(get_adapter(dense).prunable_modules(0))
    dense_ref = reference_stats(dense, ids, layer=1)

    runs = {}
    for sequential in (True, False):
        model = copy.deepcopy(dense)
        method = HalfByMagnitude()
        prune_model(model, method, ids, 0.5, "unstructured", None, {**CPU, "sequential": sequential})
        runs[sequential] = (model, method.seen[n0 : n0 + len(names)])

    # sequential=false: layer 1 calibrates on the dense model's inputs
    for name, stats in zip(names, runs[False][1]):
        sq, hess, ntok = dense_ref[name]
        assert stats.ntokens == ntok
        torch.testing.assert_close(stats.sq_norm.double(), sq, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.hessian.double(), hess, rtol=1e-4, atol=1e-4)

    # sequential=true: layer 1 calibrates on what layer 0, pruned, feeds it
    half = copy.deepcopy(dense)
    pruned_model = runs[True][0]
    get_adapter(half).layers[0].load_state_dict(get_adapter(pruned_model).layers[0].state_dict())
    seq_ref = reference_stats(half, ids, layer=1)
    for name, stats in zip(names, runs[True][1]):
        sq, hess, _ = seq_ref[name]
        torch.testing.assert_close(stats.sq_norm.double(), sq, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.hessian.double(), hess, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(stats.sq_norm.double(), dense_ref[name][0], rtol=1e-3)


def test_stats_do_not_depend_on_batch_size():
    ids = random_ids(nsamples=4, seqlen=16)
    seen = {}
    for batch_size in (1, 3):  # 3 gives batches of 3 and 1 windows
        method = KeepAll()
        prune_model(BUILDERS["llama"](), method, ids, 0.5, "unstructured", None, {**CPU, "batch_size": batch_size})
        seen[batch_size] = method.seen
    for a, b in zip(seen[1], seen[3]):
        torch.testing.assert_close(a.sq_norm, b.sq_norm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-5, atol=1e-5)


class SpoilsDisposable(KeepAll):
    """Records (stats, disposable, whether its Hessian was intact) and ruins every disposable Hessian."""

    name = "spoils_disposable"
    needs = frozenset({HESSIAN})

    def prune(self, weight, stats, sparsity, pattern):
        self.seen.append((stats, stats.disposable, bool(torch.isfinite(stats.hessian).all())))
        if stats.disposable:
            stats.hessian.fill_(float("nan"))  # allowed: no later module reads these sums
        return PruneResult(weight=weight.clone(), mask=torch.ones_like(weight, dtype=torch.bool))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # GPT-2's fused c_attn shares nothing
def test_only_the_last_reader_of_shared_statistics_may_overwrite_them(arch):
    model = BUILDERS[arch]()
    method = SpoilsDisposable()
    prune_model(model, method, random_ids(nsamples=2, seqlen=8), 0.5, "unstructured", None, CPU)
    groups: dict[int, list[bool]] = {}
    for stats, disposable, intact in method.seen:
        assert intact, "a module was given statistics an earlier module had been allowed to overwrite"
        groups.setdefault(id(stats), []).append(disposable)
    assert len(method.seen) == sum(len(get_adapter(model).prunable_modules(i)) for i in range(get_adapter(model).num_layers))
    assert any(len(flags) > 1 for flags in groups.values()), "the tiny model shares statistics (q/k/v)"
    for flags in groups.values():
        assert flags == [False] * (len(flags) - 1) + [True]


def test_statistics_are_shared_only_for_the_same_unmodified_input():
    from prunelab.models.adapters import PrunableModule
    from prunelab.prune.stats import StatsCollector as _StatsCollector

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            x = x.clone()
            ya, yb = self.a(x), self.b(x)
            x.mul_(2.0)  # same object, new contents: c must not reuse a's statistics
            return ya + yb + self.c(x)

    toy = Toy()
    modules = [PrunableModule(0, n, n, getattr(toy, n)) for n in "abc"]
    collector = _StatsCollector(modules, frozenset({SQ_NORM}), torch.device("cpu"))
    xs = [torch.randn(5, 4) for _ in range(3)]
    with torch.no_grad():
        for x in xs:
            toy(x)
            collector.end_batch()
    collector.remove()
    assert collector.shared_with == {"b": "a"}
    assert collector.stats["b"] is collector.stats["a"]
    expected = sum((x * x).sum(0) for x in xs)
    torch.testing.assert_close(collector.stats["a"].sq_norm, expected)
    torch.testing.assert_close(collector.stats["c"].sq_norm, 4 * expected)
    assert collector.stats["a"].ntokens == collector.stats["c"].ntokens == 15


def _expected_unstructured(numel: int, s: float) -> float:
    return math.floor(numel * s + 1e-6) / numel


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method_name", ["magnitude", "wanda", "sparsegpt"])
def test_achieved_sparsity_matches_target(arch, method_name):
    ids = random_ids(nsamples=2, seqlen=16)
    model = BUILDERS[arch]()
    report = prune_model(model, build_method(method_name), ids, 0.5, "unstructured", None, CPU)
    measured = zero_fraction(model)
    modules = {m.full_name: m for m in get_adapter(model).iter_prunable()}
    for name, fraction in measured.items():
        w = modules[name].get_weight()
        if method_name == "wanda":  # Wanda compares within rows: floor(in·s) per row
            expected = math.floor(w.shape[1] * 0.5) * w.shape[0] / w.numel()
        else:
            expected = _expected_unstructured(w.numel(), 0.5)
        assert fraction == pytest.approx(expected, abs=1e-9), name
    assert report.summary.per_module == pytest.approx(measured)
    assert {r.name: r.achieved for r in report.modules} == pytest.approx(measured)

    model = BUILDERS[arch]()
    report = prune_model(model, build_method(method_name), ids, 0.5, "2:4", None, CPU)
    for m in get_adapter(model).iter_prunable():
        w = m.get_weight()
        zeros_per_group = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((zeros_per_group >= 2).all()), m.full_name
    assert report.summary.nm_ok and report.summary.overall >= 0.5


def test_explicit_allocation_sets_each_layer():
    model = BUILDERS["llama"]()
    allocation = {"name": "explicit", "layers": {"0": 0.25, "1-2": 0.75}}
    report = prune_model(model, build_method("magnitude"), None, 0.5, "unstructured", allocation, CPU)
    assert report.layer_targets == [0.25, 0.75, 0.75]
    for m in get_adapter(model).iter_prunable():
        s = 0.25 if m.layer == 0 else 0.75
        assert float((m.module.weight == 0).float().mean()) == pytest.approx(_expected_unstructured(m.module.weight.numel(), s))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_ratios_match_a_dense_reference(method, monkeypatch):
    from prunelab.prune import stats as stats_module

    collected: list[frozenset] = []

    class SpyCollector(stats_module.StatsCollector):
        def __init__(self, modules, needs, device):
            collected.append(needs)
            super().__init__(modules, needs, device)

    monkeypatch.setattr(stats_module, "StatsCollector", SpyCollector)
    dense = BUILDERS["llama"]()
    ids = random_ids(nsamples=2, seqlen=16)
    model = copy.deepcopy(dense)
    allocation = {"name": "owl", "lam": 0.08, "m": 2.0}
    report = prune_model(model, build_method(method), ids, 0.5, "unstructured", allocation, CPU)
    layers = get_adapter(dense).num_layers
    # the pre-pass (one collector per layer, before pruning) gathers only ‖X‖², whatever the method needs
    assert collected[:layers] == [frozenset({"sq_norm"})] * layers
    assert collected[layers:] == [build_method(method).needs] * layers
    adapter = get_adapter(dense)
    expected = []
    for layer in range(adapter.num_layers):
        ref = reference_stats(dense, ids, layer)
        scores = torch.cat(
            [(m.get_weight().double().abs() * ref[m.name][0].sqrt()).flatten() for m in adapter.prunable_modules(layer)]
        )
        expected.append(float((scores > 2.0 * scores.mean()).double().mean()))
    # float32 vs float64 scores may put a couple of the 36,864 scores per layer across the threshold
    assert report.outlier_ratios == pytest.approx(expected, abs=1e-4)
    targets = report.layer_targets
    assert sum(targets) / len(targets) == pytest.approx(0.5)
    assert max(targets) - min(targets) == pytest.approx(0.16)
    # the layer with the most outliers is pruned least
    assert targets.index(min(targets)) == expected.index(max(expected))
    for m in get_adapter(model).iter_prunable():
        w = m.get_weight()
        per_row = math.floor(w.shape[1] * targets[m.layer] + 1e-6)
        if method == "wanda":  # exact counts per row
            assert int((w == 0).sum()) == per_row * w.shape[0]
        else:  # SparseGPT chooses its mask per column block (plus exact zeros from dead inputs)
            assert float((w == 0).float().mean()) == pytest.approx(targets[m.layer], abs=0.03)


def test_owl_with_magnitude_uses_weights_only_and_ignores_skipped_layers():
    model = BUILDERS["llama"]()
    calls = count_calls(model.model.embed_tokens)
    allocation = {"name": "owl", "lam": 0.1, "m": 3.0}
    engine = {**CPU, "skip": [r"layers\.1\."]}
    adapter = get_adapter(model)
    expected = []
    for layer in (0, 2):
        scores = torch.cat([m.get_weight().abs().flatten() for m in adapter.prunable_modules(layer)])
        expected.append(float((scores > 3.0 * scores.mean()).float().mean()))
    report = prune_model(model, build_method("magnitude"), None, 0.5, "unstructured", allocation, engine)
    assert calls[0] == 0 and report.layer_forwards == 0
    assert report.outlier_ratios[1] is None
    assert [report.outlier_ratios[0], report.outlier_ratios[2]] == pytest.approx(expected)
    t = report.layer_targets
    assert t[1] == 0.5 and t[0] + t[2] == pytest.approx(1.0) and abs(t[0] - t[2]) == pytest.approx(0.2)
    assert float((model.model.layers[1].mlp.up_proj.weight == 0).float().mean()) == 0.0


def test_global_magnitude_prunes_the_smallest_weights_overall():
    model = BUILDERS["llama"]()
    weights = torch.cat([m.get_weight().abs().flatten() for m in get_adapter(model).iter_prunable()])
    k = math.floor(weights.numel() * 0.6)
    threshold = weights.kthvalue(k).values
    prune_model(model, build_method("magnitude", {"scope": "global"}), None, 0.6, "unstructured", None, CPU)
    pruned = torch.cat([m.get_weight().flatten() for m in get_adapter(model).iter_prunable()])
    assert int((pruned == 0).sum()) == k
    assert bool((weights[pruned == 0] <= threshold).all())
    assert bool((weights[pruned != 0] >= threshold).all())
    per_layer = measure_sparsity(model).per_layer
    assert len(set(round(v, 3) for v in per_layer.values())) > 1  # not uniform


def test_targets_and_skip_are_respected():
    ids = random_ids(nsamples=2, seqlen=16)
    dense = BUILDERS["llama"]()
    model = copy.deepcopy(dense)
    prune_model(model, build_method("wanda"), ids, 0.5, "unstructured", None, {**CPU, "targets": ["mlp"], "skip": [r"layers\.0\."]})
    for (name, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        pruned_here = ".mlp." in name and ".layers.0." not in name and name.endswith("weight")
        if pruned_here:
            assert float((p == 0).float().mean()) == pytest.approx(0.5), name
        else:
            assert torch.equal(p, q), name


def test_pattern_misfit_raises_before_any_forward():
    model = BUILDERS["llama"](intermediate_size=50)  # mlp.down_proj has 50 inputs: not a multiple of 4
    calls = count_calls(model.model.embed_tokens)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj \(in_features=50\).*M=4|M=4.*down_proj \(in_features=50\)"):
        prune_model(model, build_method("wanda"), random_ids(2, 16), 0.5, "2:4", None, CPU)
    assert calls[0] == 0
    with pytest.raises(ValueError, match="in_features=50"):
        check_pattern_fits(model, Pattern.parse("2:4"))
    check_pattern_fits(model, "2:4", skip=["down_proj"])  # fine once skipped
    check_pattern_fits(model, "1:2")  # 50 is even
    check_pattern_fits(model, "unstructured")


def test_methods_without_statistics_run_no_forward():
    model = BUILDERS["llama"]()
    calls = [count_calls(model.model.embed_tokens)] + [count_calls(layer) for layer in model.model.layers]
    for name in ("magnitude", "random"):
        report = prune_model(model, build_method(name), None, 0.5, "unstructured", None, CPU)
        assert report.layer_forwards == 0
    assert all(c[0] == 0 for c in calls)


def test_bad_settings_raise_clear_errors():
    model = BUILDERS["llama"]()
    ids = random_ids(2, 16)
    with pytest.raises(ValueError, match="prune.sequentail is not an engine setting"):
        prune_model(model, build_method("wanda"), ids, 0.5, engine={"sequentail": True})
    with pytest.raises(ValueError, match="batch_size"):
        prune_model(model, build_method("wanda"), ids, 0.5, engine={**CPU, "batch_size": 0})
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_model(model, build_method("wanda"), None, 0.5, engine=CPU)
    with pytest.raises(ValueError, match="allocation=owl needs pattern=unstructured"):
        prune_model(model, build_method("wanda"), ids, 0.5, "2:4", {"name": "owl"}, CPU)
    with pytest.raises(ValueError, match="shaped \\[nsamples, seqlen\\]"):
        prune_model(model, build_method("wanda"), ids.float(), 0.5, engine=CPU)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.0  # nothing ran


def test_report_has_timings_and_memory():
    report = prune_model(BUILDERS["llama"](), build_method("sparsegpt"), random_ids(2, 16), 0.5, engine=CPU)
    assert {"capture", "stats", "solve", "forward", "total"} <= set(report.timings)
    assert report.peak_memory_mb["cpu_peak_rss_mb"] > 0
    as_dict = report.to_dict()
    assert as_dict["summary"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert len(as_dict["modules"]) == 21 and "masks" not in as_dict


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_return_to_their_device_after_gpu_pruning():
    model = BUILDERS["llama"]()
    prune_model(model, build_method("sparsegpt"), random_ids(2, 16), 0.5, engine={"device": "cuda"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# ----------------------------------------------------------------------------- report and io
def test_nm_check_finds_a_broken_group():
    model = BUILDERS["llama"]()
    prune_model(model, build_method("magnitude"), None, 0.5, "2:4", None, CPU)
    assert check_nm(model, "2:4") == {}
    target = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        row = target.weight[3]
        zero_in_group = int((row[8:12] == 0).nonzero()[0]) + 8
        row[zero_in_group] = 0.5  # group 8..11 of row 3 now has one zero
    assert check_nm(model, "2:4") == {"model.layers.1.mlp.up_proj": 1}
    summary = measure_sparsity(model, pattern="2:4")
    assert not summary.nm_ok
    assert summary.per_layer[0] == pytest.approx(0.5)
    assert summary.per_type["mlp.up_proj"] == pytest.approx((3 * 128 * 32 - 1) / (3 * 128 * 64))


def test_measure_sparsity_per_type_and_layer():
    model = BUILDERS["gpt2"]()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.zero_()  # 32 x 128 all zero
        model.transformer.h[1].attn.c_attn.weight[:16].zero_()  # half of 32 x 96
    s = measure_sparsity(model)
    assert s.per_module["transformer.h.0.mlp.c_fc"] == 1.0
    assert s.per_type["mlp.c_fc"] == pytest.approx(0.5)
    assert s.per_type["attn.c_attn"] == pytest.approx(0.25)
    layer0 = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32
    assert s.per_layer[0] == pytest.approx(32 * 128 / layer0)
    assert s.overall == pytest.approx((32 * 128 + 16 * 96) / (2 * layer0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masks_and_weights_round_trip(tmp_path, arch):
    ids = random_ids(2, 16)
    dense = BUILDERS[arch]()
    model = copy.deepcopy(dense)
    report = prune_model(model, build_method("sparsegpt"), ids, 0.5, "unstructured", None, {**CPU, "save_masks": True})
    assert set(report.masks) == {f"{m.full_name}.weight" for m in select_modules(model)}
    save_masks(report.masks, tmp_path / "masks.safetensors")
    save_pruned_weights(model, tmp_path / "weights.safetensors")

    loaded = load_masks(tmp_path / "masks.safetensors")
    params = dict(model.named_parameters())
    for name, mask in loaded.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert torch.equal(mask, params[name] != 0)  # random weights: kept ones are never exactly 0
    assert all(torch.equal(loaded[k], v) for k, v in masks_from_model(model).items())

    masked = copy.deepcopy(dense)
    apply_masks(masked, loaded)
    for (name, p), (_, q) in zip(masked.named_parameters(), dense.named_parameters()):
        expected = q * loaded[name] if name in loaded else q
        assert torch.equal(p, expected), name

    restored = copy.deepcopy(dense)
    assert load_pruned_weights(restored, tmp_path / "weights.safetensors") == len(loaded)
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)

    with pytest.raises(ValueError, match="expected 'prunelab-keep-masks'"):
        load_masks(tmp_path / "weights.safetensors")
    with pytest.raises(KeyError, match="another architecture"):
        apply_masks(BUILDERS["opt"](), loaded)
