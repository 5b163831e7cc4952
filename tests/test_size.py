"""Compressed sparse save/load, parameter counts and FLOPs per token against hand computations."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from prunelab.eval.size import count_parameters, flops_per_token, measure_size, prunable_linears
from prunelab.io.compressed import load_compressed, pack_bits, save_compressed, unpack_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# tiny Llama: hidden 32, MLP 64, 2 layers, 4 query heads of 8, 2 kv heads, vocab 100
H, I, L, NH, NKV, V = 32, 64, 2, 4, 2, 100
HD = H // NH


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def random_sparse(shape: tuple[int, ...], sparsity: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(shape, generator=gen) + 0.01).to(dtype)  # no accidental exact zeros
    tensor[tensor == 0] = 1
    numel = tensor.numel()
    drop = torch.randperm(numel, generator=gen)[: round(sparsity * numel)]
    tensor.view(-1)[drop] = 0
    return tensor


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        return torch.equal(a.view(INT_OF[a.dtype]), b.view(INT_OF[b.dtype]))
    return torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ sparse io
def test_pack_bits_matches_naive_reference() -> None:
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.5  # 21 bits: a partial last byte
    flat = mask.reshape(-1).tolist()
    expected = [sum(int(flat[8 * j + i]) << i for i in range(8) if 8 * j + i < len(flat)) for j in range(3)]
    assert pack_bits(mask).tolist() == expected
    assert torch.equal(unpack_bits(pack_bits(mask), mask.numel()), mask.reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(dtype: torch.dtype, tmp_path) -> None:
    state = {
        "half_sparse": random_sparse((33, 20), 0.5, dtype, seed=1),  # 660 elements: not a multiple of 8
        "very_sparse": random_sparse((4, 5, 7), 0.9, dtype, seed=2),
        "dense": random_sparse((16, 16), 0.0, dtype, seed=3),
        "all_zero": torch.zeros(8, 12, dtype=dtype),
        "vector": random_sparse((37,), 0.6, dtype, seed=4),
        "steps": torch.arange(10),  # integers are stored as they are
    }
    state["half_sparse"][0, :3] = torch.tensor([-0.0, float("nan"), float("inf")], dtype=dtype)
    summary = save_compressed(state, tmp_path / "m.safetensors")
    assert summary["compressed"] == 4  # half_sparse, very_sparse, all_zero, vector
    loaded = load_compressed(tmp_path / "m.safetensors")
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert bits_equal(loaded[name], tensor), name
    assert torch.signbit(loaded["half_sparse"][0, 0])  # -0.0 survives as -0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_compressed_size_matches_closed_form(dtype: torch.dtype, tmp_path) -> None:
    rows, cols = 512, 512
    weight = random_sparse((rows, cols), 0.5, dtype, seed=5)
    save_file({"w": weight}, tmp_path / "dense.safetensors")
    save_compressed({"w": weight}, tmp_path / "sparse.safetensors")
    itemsize = torch.finfo(dtype).bits // 8
    numel = rows * cols
    # bitmask (1 bit per element) + half the values, against all values
    expected = (numel / 8 + numel / 2 * itemsize) / (numel * itemsize)
    ratio = os.path.getsize(tmp_path / "sparse.safetensors") / os.path.getsize(tmp_path / "dense.safetensors")
    assert ratio == pytest.approx(expected, rel=0.01)
    assert ratio < 0.6


def test_tied_weights_and_model_state_dict(tmp_path) -> None:
    model = tiny_llama(tie=True)
    with torch.no_grad():
        for module in prunable_linears(model).values():
            module.weight.mul_(torch.rand_like(module.weight) > 0.5)
    save_compressed(model, tmp_path / "m.safetensors")
    loaded = load_compressed(tmp_path / "m.safetensors")
    reference = model.state_dict()
    assert set(loaded) == set(reference)
    for name, tensor in reference.items():
        assert bits_equal(loaded[name], tensor), name
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]
    fresh = tiny_llama(tie=True)
    fresh.load_state_dict(loaded)
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_load_rejects_a_plain_safetensors_file(tmp_path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="save_compressed"):
        load_compressed(tmp_path / "plain.safetensors")


# ------------------------------------------------------------------------------------------- counts, FLOPs
def hand_counts(tie: bool) -> tuple[int, int]:
    """(all parameters, prunable Linear weights) of the tiny Llama, written out by hand."""
    attn = H * H + H * (NKV * HD) + H * (NKV * HD) + H * H  # q, k, v, o (no biases)
    mlp = 3 * H * I  # gate, up, down
    norms = 2 * H  # input and post-attention RMSNorm
    prunable = L * (attn + mlp)
    total = V * H + L * (attn + mlp + norms) + H + (0 if tie else V * H)  # embeddings, layers, final norm, head
    return total, prunable


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_counts_match_hand_count(tie: bool) -> None:
    model = tiny_llama(tie)
    total, prunable = hand_counts(tie)
    with torch.no_grad():
        linears = prunable_linears(model)
        assert len(linears) == 7 * L
        linears["model.layers.0.mlp.up_proj"].weight[:, ::2] = 0  # half of one MLP matrix: H*I/2 zeros
        linears["model.layers.1.self_attn.q_proj"].weight.zero_()  # one whole matrix: H*H zeros
    zeros = H * I // 2 + H * H
    counts = count_parameters(model)
    assert counts["total"] == total
    assert counts["nonzero"] == total - zeros
    assert counts["prunable"]["total"] == prunable
    assert counts["prunable"]["nonzero"] == prunable - zeros
    assert counts["prunable"]["sparsity"] == pytest.approx(zeros / prunable)
    assert counts["prunable"]["modules"] == 7 * L


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_match_hand_formula(tie: bool) -> None:
    model = tiny_llama(tie)
    with torch.no_grad():
        prunable_linears(model)["model.layers.1.mlp.down_proj"].weight[::4] = 0  # I of every 4th output row
    zeroed = (H // 4) * I
    ctx = 48
    _, prunable = hand_counts(tie)
    macs_dense = prunable + V * H  # lm_head is a matmul even when tied to the embeddings
    attention = L * (2 * NH * HD * ctx + 2 * NH * HD * ctx)  # QK^T scores and the weighted sum of V
    flops = flops_per_token(model, ctx)
    assert flops["linear_dense"] == 2 * macs_dense
    assert flops["linear"] == 2 * (macs_dense - zeroed)
    assert flops["attention"] == attention
    assert flops["total"] == 2 * (macs_dense - zeroed) + attention
    assert "lm_head included" in flops["counting"]
    with pytest.raises(ValueError, match="context_len"):
        flops_per_token(model, 0)


def test_sliding_window_layers_cap_the_attention_term() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                           num_attention_heads=NH, num_key_value_heads=NKV, sliding_window=16)
    model = MistralForCausalLM(config)
    # Mistral slides every layer's window: each token attends to 16 keys, not 100
    assert flops_per_token(model, 100)["attention"] == L * 4 * NH * HD * 16
    assert flops_per_token(model, 10)["attention"] == L * 4 * NH * HD * 10  # shorter than the window


def test_measure_size_on_a_half_sparse_model(tmp_path) -> None:
    model = tiny_llama()
    with torch.no_grad():
        for module in prunable_linears(model).values():
            module.weight[:, 1::2] = 0  # exactly 50% of every prunable weight

    class SizeCfg:
        save_compressed = True

    result = measure_size(model, SizeCfg(), out_dir=tmp_path, context_len=32)
    total, prunable = hand_counts(False)
    assert result["params"]["prunable"]["sparsity"] == pytest.approx(0.5)
    assert result["params"]["nonzero"] == total - prunable // 2
    # dense file: every parameter in fp32 plus a small header; compressed: the sparse half of the
    # prunable weights is gone and 1 bit per element is added
    assert result["disk"]["dense_bytes"] >= 4 * total
    assert result["disk"]["dense_bytes"] < 4 * total + 4096
    expected = 4 * (total - prunable) + 4 * prunable / 2 + prunable / 8
    assert result["disk"]["compressed_bytes"] == pytest.approx(expected, abs=8192)
    path = result["disk"]["compressed_path"]
    assert os.path.isfile(path) and os.path.dirname(path) == str(tmp_path)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".size-")] == []  # temporary files are gone
    loaded = load_compressed(path)
    for name, tensor in model.state_dict().items():
        assert bits_equal(loaded[name], tensor), name
    assert result["flops_per_token"]["context_len"] == 32
    assert math.isfinite(result["disk"]["ratio"]) and result["disk"]["ratio"] < 0.8


def test_alternating_layer_types_cap_only_sliding_layers() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=NH, num_key_value_heads=NKV, sliding_window=16, use_sliding_window=True,
                         layer_types=["full_attention", "sliding_attention"])
    model = Qwen2ForCausalLM(config)
    assert flops_per_token(model, 100)["attention"] == 4 * NH * HD * (100 + 16)


# ------------------------------------------------------------------------- computed vs written file bytes
def _sparsify(model: torch.nn.Module, sparsity: float) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in prunable_linears(model).values():
            module.weight[torch.rand(module.weight.shape, generator=gen) < sparsity] = 0


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_computed_disk_bytes_equal_the_written_files(tie: bool, dtype: torch.dtype, sparsity: float, tmp_path) -> None:
    from prunelab.eval.size import dense_bytes, dense_file_bytes
    from prunelab.io.compressed import compressed_file_bytes

    model = tiny_llama(tie).to(dtype)
    _sparsify(model, sparsity)
    assert dense_file_bytes(model) == dense_bytes(model, tmp_path)
    written = save_compressed(model, tmp_path / "c.safetensors")["bytes"]
    assert compressed_file_bytes(model) == written == os.path.getsize(tmp_path / "c.safetensors")


def test_computed_disk_bytes_of_gpt2_with_buffers_and_mixed_dtypes(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from prunelab.eval.size import dense_bytes, dense_file_bytes
    from prunelab.io.compressed import compressed_file_bytes, safetensors_file_bytes

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    _sparsify(model, 0.6)
    model.register_buffer("step_count", torch.tensor([3, 4], dtype=torch.int64))  # a non-float entry
    assert dense_file_bytes(model) == dense_bytes(model, tmp_path)
    assert compressed_file_bytes(model) == save_compressed(model, tmp_path / "c.safetensors")["bytes"]
    # every dtype safetensors lays out, names in any order, with and without metadata
    tensors = {f"z{i}.{dtype}": torch.zeros(i + 3, 2, dtype=dtype) for i, dtype in enumerate(
        [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
         torch.float32, torch.float64, torch.int64])}
    for metadata in (None, {"note": 'quotes " and \\ backslash, ünïcode'}):
        save_file(tensors, tmp_path / "all.safetensors", metadata=metadata)
        computed = safetensors_file_bytes({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata)
        assert computed == os.path.getsize(tmp_path / "all.safetensors")


def test_measure_size_computes_without_writing_and_agrees_with_write_mode(tmp_path) -> None:
    model = tiny_llama(tie=True)
    _sparsify(model, 0.5)

    class Computed:
        save_compressed = False
        disk = "compute"

    class Written(Computed):
        disk = "write"

    computed = measure_size(model, Computed(), out_dir=tmp_path / "c", context_len=16)
    written = measure_size(model, Written(), out_dir=tmp_path / "w", context_len=16)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing written
    for key in ("dense_bytes", "compressed_bytes", "ratio"):
        assert computed["disk"][key] == written["disk"][key]
    assert computed["disk"]["measured_by"] != written["disk"]["measured_by"]
