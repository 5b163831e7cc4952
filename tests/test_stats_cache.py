"""Dense statistics shared by the non-sequential jobs of a sweep (``prunelab.prune.stats_cache``).

The reference for every cached run is the same run with no cache at all: equal weights, bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunelab.prune.engine import prune_model
from prunelab.prune.methods import build_method
from tiny_models import random_ids, tiny_llama

NONSEQ = {"sequential": False}


def _prune(model, method, ids, sparsity, cache_dir=None, engine=NONSEQ, pattern="unstructured"):
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, build_method(method, {}), ids, sparsity, pattern, engine=engine, cache_dir=cache_dir)
    return pruned, report


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method,second", [("wanda", (0.7, "unstructured")), ("sparsegpt", (0.5, "2:4"))])
def test_a_later_job_reads_the_dense_statistics_and_runs_no_forward(tmp_path, method, second):
    model, ids = tiny_llama(num_hidden_layers=3), random_ids(4, 16)
    _, first = _prune(model, method, ids, 0.5, tmp_path)
    assert first.stats_cache["hit"] is False and first.layer_forwards == 3
    sparsity, pattern = second
    cached, report = _prune(model, method, ids, sparsity, tmp_path, pattern=pattern)
    assert report.stats_cache == {**first.stats_cache, "hit": True}
    assert report.layer_forwards == 0  # every layer solved from the stored statistics
    reference, _ = _prune(model, method, ids, sparsity, pattern=pattern)  # no cache at all
    assert _equal(cached, reference)


def test_sequential_runs_and_other_inputs_never_share(tmp_path):
    model, ids = tiny_llama(), random_ids(4, 16)
    _, sequential = _prune(model, "wanda", ids, 0.5, tmp_path, engine={"sequential": True})
    assert sequential.stats_cache is None  # each layer's inputs depend on the pruning before it
    _, first = _prune(model, "wanda", ids, 0.5, tmp_path)
    _, other_calibration = _prune(model, "wanda", random_ids(4, 16, seed=1), 0.5, tmp_path)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    _, other_weights = _prune(changed, "wanda", ids, 0.5, tmp_path)
    _, other_needs = _prune(model, "sparsegpt", ids, 0.5, tmp_path)
    keys = {r.stats_cache["key"] for r in (first, other_calibration, other_weights, other_needs)}
    assert len(keys) == 4 and not any(r.stats_cache["hit"] for r in (other_calibration, other_weights, other_needs))


def test_a_corrupted_entry_is_recomputed_not_trusted(tmp_path, caplog):
    model, ids = tiny_llama(), random_ids(4, 16)
    _, first = _prune(model, "sparsegpt", ids, 0.5, tmp_path)
    layer_file = tmp_path / "stats" / first.stats_cache["key"] / "layer-1.safetensors"
    data = bytearray(layer_file.read_bytes())
    data[-5] ^= 0xFF  # one bit pattern of one Hessian entry
    layer_file.write_bytes(bytes(data))
    pruned, again = _prune(model, "sparsegpt", ids, 0.6, tmp_path)
    assert again.stats_cache["hit"] is False and "sha256" in caplog.text
    reference, _ = _prune(model, "sparsegpt", ids, 0.6)
    assert _equal(pruned, reference)
    _, third = _prune(model, "sparsegpt", ids, 0.6, tmp_path)  # the rewritten entry is trusted again
    assert third.stats_cache["hit"] is True


def test_a_failed_run_leaves_no_entry(tmp_path):
    model, ids = tiny_llama(num_hidden_layers=3), random_ids(4, 16)
    method = build_method("wanda", {})
    original, calls = method.prune, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    method.prune = failing
    with pytest.raises(KeyboardInterrupt):
        prune_model(copy.deepcopy(model), method, ids, 0.5, engine=NONSEQ, cache_dir=tmp_path)
    assert list((tmp_path / "stats").iterdir()) == []
    _, report = _prune(model, "wanda", ids, 0.5, tmp_path)
    assert report.stats_cache["hit"] is False


def test_stored_statistics_are_the_inputs_sums(tmp_path):
    """Layer 0's q/k/v input is the normed embedding: its X Xᵀ and token count, computed by hand."""
    from prunelab.models.adapters import get_adapter
    from prunelab.prune.stats import HESSIAN
    from prunelab.prune.stats_cache import StatsCache

    model, ids = tiny_llama(num_hidden_layers=2), random_ids(4, 16)
    _, report = _prune(model, "sparsegpt", ids, 0.5, tmp_path, engine={**NONSEQ, "batch_size": 2})
    manifest = json.loads((tmp_path / "stats" / report.stats_cache["key"] / "manifest.json").read_text())
    entry = StatsCache(tmp_path / "stats").open(manifest["parts"], 2)  # the parts it was stored under
    assert entry.hit
    modules = [m for m in get_adapter(model).prunable_modules(0) if m.name.startswith("self_attn.")]
    stats = entry.load_layer(0, modules, frozenset({HESSIAN}), torch.device("cpu"))
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        x = x.reshape(-1, x.shape[-1])
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert stats[name].ntokens == 64
        torch.testing.assert_close(stats[name].hessian, x.t() @ x, rtol=1e-5, atol=1e-5)
    assert stats["self_attn.k_proj"] is stats["self_attn.q_proj"]  # one shared input, one object


def test_share_stats_false_and_frozen_masks_keep_the_cache_out(tmp_path):
    model, ids = tiny_llama(), random_ids(4, 16)
    _, off = _prune(model, "wanda", ids, 0.5, tmp_path, engine={**NONSEQ, "share_stats": False})
    frozen = {"model.layers.0.mlp.up_proj.weight": torch.ones_like(model.model.layers[0].mlp.up_proj.weight, dtype=torch.bool)}
    report = prune_model(copy.deepcopy(model), build_method("wanda", {}), ids, 0.5, engine=NONSEQ, frozen=frozen,
                         cache_dir=tmp_path)
    assert off.stats_cache is None and report.stats_cache is None
    assert not (tmp_path / "stats").exists() or list((tmp_path / "stats").iterdir()) == []


def test_a_norm_outside_the_targets_changes_the_key(tmp_path):
    """Layer norms are never pruned but shape every Linear's input: they are part of the key."""
    model, ids = tiny_llama(), random_ids(4, 16)
    _, first = _prune(model, "wanda", ids, 0.5, tmp_path)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].input_layernorm.weight.mul_(2.0)
    _, second = _prune(changed, "wanda", ids, 0.5, tmp_path)
    assert second.stats_cache["hit"] is False and second.stats_cache["key"] != first.stats_cache["key"]


def _unaligned_copy(tensor):
    """``tensor``'s values in memory that starts 4 bytes past a 64-byte boundary, as a safetensors view may."""
    flat = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    view = flat[1:].view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % 64 != 0
    return view


@pytest.mark.parametrize("n", [64, 96, 192])
def test_the_in_place_factorisation_equals_the_copying_one_on_any_buffer(n):
    """SparseGPT's in-place solve (the Hessian's last reader) must round like the copying solve.

    MKL factors an unaligned matrix by another code path; the in-place path is taken only when the
    buffer is laid out like a fresh copy, so both give the same bits on AVX2 and AVX-512 machines.
    """
    from prunelab.prune.methods.sparsegpt import inverse_hessian_factor

    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(n))
    hessian = x.t() @ x
    reference, _ = inverse_hessian_factor(hessian.clone(), 0.01)  # the copying path
    for buffer in (hessian.clone(), _unaligned_copy(hessian)):
        in_place, _ = inverse_hessian_factor(buffer, 0.01, overwrite=True)
        assert torch.equal(in_place, reference)


def test_statistics_read_from_the_cache_are_in_aligned_memory(tmp_path):
    from prunelab.models.adapters import get_adapter
    from prunelab.prune.stats import HESSIAN
    from prunelab.prune.stats_cache import StatsCache

    model, ids = tiny_llama(num_hidden_layers=2), random_ids(4, 16)
    _, report = _prune(model, "sparsegpt", ids, 0.5, tmp_path)
    manifest = json.loads((tmp_path / "stats" / report.stats_cache["key"] / "manifest.json").read_text())
    entry = StatsCache(tmp_path / "stats").open(manifest["parts"], 2)
    for layer in (0, 1):
        stats = entry.load_layer(layer, get_adapter(model).prunable_modules(layer), frozenset({HESSIAN}), torch.device("cpu"))
        assert all(s.hessian.is_contiguous() and s.hessian.data_ptr() % 64 == 0 for s in stats.values())


def test_another_thread_count_is_another_machine_for_the_cache(tmp_path):
    """A cache folder shared by machines that sum differently never serves one's sums to the other."""
    model, ids = tiny_llama(), random_ids(4, 16)
    _, first = _prune(model, "wanda", ids, 0.5, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        _, other = _prune(model, "wanda", ids, 0.5, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert other.stats_cache["hit"] is False and other.stats_cache["key"] != first.stats_cache["key"]
