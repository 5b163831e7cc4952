"""Structured surgery: removing heads, MLP neurons or layers equals zeroing what they add (a closed
fact about the forward), the KV cache still works, widths land in the config, and a uniformly shrunk
model saves and loads with plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelab.models import surgery
from prunelab.models.adapters import get_adapter

VOCAB = 64


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.0, attention_dropout=0.0))


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3, "gpt2": _gpt2, "opt": _opt}


def _model(name, attention="sdpa"):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    model.set_attn_implementation(attention)  # eager reads num_key_value_groups; sdpa infers it from shapes
    with torch.no_grad():  # biases that are zero at initialisation would hide a forgotten bias slice
        for module in model.modules():
            if getattr(module, "bias", None) is not None and isinstance(module.bias, torch.nn.Parameter):
                module.bias.normal_(0, 0.1)
    return model


def _ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _module(model, layer, name):
    block = get_adapter(model).layers[layer]
    for part in name.split("."):
        block = getattr(block, part)
    return block


@torch.no_grad()
def _zero_inputs(module, columns):
    """Zero the given input columns of a Linear ([out, in]) or Conv1D ([in, out])."""
    if isinstance(module, torch.nn.Linear):
        module.weight[:, columns] = 0
    else:
        module.weight[columns, :] = 0


def _cols(heads, head_dim):
    return [h * head_dim + j for h in heads for j in range(head_dim)]


# heads removed: one query head in each KV group, or one whole KV group (GQA); any heads otherwise
HEADS = {"llama": [[0, 3], [2, 3]], "qwen2": [[1, 2], [0, 1]], "gemma3": [[0, 2], [0, 1]],
         "gpt2": [[1], [0, 3]], "opt": [[2], [1, 3]]}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name,heads", [(n, h) for n, hs in HEADS.items() for h in hs])
def test_removing_heads_equals_zeroing_their_output_columns(name, heads, attention):
    model = _model(name, attention)
    spec = surgery.unit_spec(model)
    n_heads, n_kv, head_dim = surgery.attention_shape(model, 1)
    reference = _copy(model)
    _zero_inputs(_module(reference, 1, spec.o), _cols(heads, head_dim))
    params = sum(p.numel() for p in model.parameters())
    surgery.remove_heads(model, 1, heads)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=1e-5)
    new_heads, new_kv, _ = surgery.attention_shape(model, 1)
    assert new_heads == n_heads - len(heads)
    groups_gone = len(heads) // (n_heads // n_kv) if spec.grouped and len(heads) == n_heads // n_kv and \
        len({h // (n_heads // n_kv) for h in heads}) == 1 else 0
    assert new_kv == (n_kv - groups_gone if spec.grouped else new_heads)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    # q rows + o columns per head; k and v rows per removed KV head; q/k/v biases where they exist
    removed = 2 * len(heads) * head_dim * hidden + 2 * (n_kv - new_kv) * head_dim * hidden
    removed += sum(len(heads if n == "q" else range(n_kv - new_kv)) * head_dim for n in ("q", "k", "v")
                   if _has_bias(reference, spec, n))
    assert params - sum(p.numel() for p in model.parameters()) == removed


def _has_bias(model, spec, which):
    if spec.qkv is not None:
        return _module(model, 1, spec.qkv).bias is not None
    return _module(model, 1, getattr(spec, which)).bias is not None


def test_heads_must_leave_every_kv_group_equally_wide():
    model = _model("llama")
    with pytest.raises(ValueError, match="same number"):
        surgery.remove_heads(model, 0, [0])  # 2 heads per group: group 0 keeps 1, group 1 keeps 2
    with pytest.raises(ValueError, match="leave nothing"):
        surgery.remove_heads(model, 0, [0, 1, 2, 3])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_removing_neurons_equals_zeroing_their_down_columns(name):
    model = _model(name)
    spec = surgery.unit_spec(model)
    neurons = [0, 5, 17, 47]
    reference = _copy(model)
    _zero_inputs(_module(reference, 2, spec.mlp_out), neurons)
    width = surgery.mlp_width(model, 2)
    surgery.remove_neurons(model, 2, neurons)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=1e-5)
    assert surgery.mlp_width(model, 2) == width - len(neurons)


@torch.no_grad()
def _silence_layer(model, layer):
    """Zero what a layer adds to the residual stream: its attention and MLP output projections."""
    spec = surgery.unit_spec(model)
    for name in (spec.o, spec.mlp_out):
        module = _module(model, layer, name)
        module.weight.zero_()
        if module.bias is not None:
            module.bias.zero_()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_removing_a_layer_equals_silencing_it_and_the_kv_cache_follows(name):
    model = _model(name)
    reference = _copy(model)
    _silence_layer(reference, 1)
    surgery.remove_layers(model, [1])
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=1e-5)
    assert get_adapter(model).num_layers == 2
    assert [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx") and m is not model] == \
        sorted(m.layer_idx for m in model.modules() if hasattr(m, "layer_idx") and m is not model)
    if name == "gemma3":
        assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    # generation with the KV cache: the shrunk model and the silenced one agree token for token
    prompt = _ids()[:1, :5]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))


def test_a_removed_layer_is_the_identity():
    model = _model("llama")
    reference = _copy(model)

    class Identity(torch.nn.Module):
        def __init__(self, layer_idx):
            super().__init__()

        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    reference.model.layers[0] = Identity(0)
    surgery.remove_layers(model, [0])
    with torch.no_grad():
        got = model(input_ids=_ids(), use_cache=False).logits
        want = reference(input_ids=_ids(), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_uniformly_shrunk_model_saves_and_loads_with_plain_transformers(tmp_path):
    model = _model("llama")
    for layer in range(3):
        surgery.remove_heads(model, layer, [1, 2])  # one query head of each KV group
        surgery.remove_neurons(model, layer, range(0, 48, 3))
    surgery.remove_layers(model, [2])
    assert surgery.sync_config(model) is True
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim,
            model.config.intermediate_size, model.config.num_hidden_layers) == (2, 2, 8, 32, 2)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), expected)


def test_per_layer_widths_are_recorded_when_they_differ():
    model = _model("qwen2")
    surgery.remove_neurons(model, 0, [1, 2, 3])
    assert surgery.sync_config(model) is False
    assert [w["mlp"] for w in model.config.prunelab_widths] == [45, 48, 48]
