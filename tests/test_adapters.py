"""Architecture adapters: layer lists, prunable modules, [out, in] weight views, selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.pytorch_utils import Conv1D

from prunelab.models.adapters import UnsupportedArchitectureError, get_adapter, select_modules
from tiny_models import BUILDERS

LLAMA_NAMES = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]
EXPECTED = {
    "llama": ("model.layers", LLAMA_NAMES),
    "mistral": ("model.layers", LLAMA_NAMES),
    "qwen2": ("model.layers", LLAMA_NAMES),
    "gemma3": ("model.layers", LLAMA_NAMES),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "opt": ("model.decoder.layers", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"]),
}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_layers_and_prunable_modules(arch):
    model = BUILDERS[arch]()
    adapter = get_adapter(model)
    layers_path, names = EXPECTED[arch]
    assert adapter.layers_path == layers_path
    assert adapter.num_layers == model.config.num_hidden_layers
    assert adapter.layers is model.get_submodule(layers_path)
    named = dict(model.named_modules())
    for index in range(adapter.num_layers):
        modules = adapter.prunable_modules(index)
        assert [m.name for m in modules] == names
        for m in modules:
            assert m.full_name == f"{layers_path}.{index}.{m.name}"
            assert named[m.full_name] is m.module


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_weight_view_is_out_by_in(arch):
    """``x @ W.T + b`` with W = get_weight() must reproduce the module, Conv1D included."""
    model = BUILDERS[arch]()
    for m in get_adapter(model).prunable_modules(0):
        x = torch.randn(3, m.in_features)
        with torch.no_grad():
            assert torch.allclose(F.linear(x, m.get_weight(), m.module.bias), m.module(x), atol=1e-6)
        assert m.transposed == isinstance(m.module, Conv1D)


def test_conv1d_set_weight_writes_transposed():
    model = BUILDERS["gpt2"]()
    m = get_adapter(model).prunable_modules(0)[0]  # attn.c_attn: in 32, out 96
    assert (m.in_features, m.out_features) == (32, 96)
    new = torch.arange(96 * 32, dtype=torch.float32).reshape(96, 32)
    m.set_weight(new)
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.allclose(m.module(x), x @ new.t() + m.module.bias, rtol=1e-5, atol=1e-2)
    assert m.module.weight[5, 7].item() == new[7, 5].item()
    with pytest.raises(ValueError, match=r"expected \[out, in\]"):
        m.set_weight(new.t())


def test_set_weight_keeps_dtype():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    m = get_adapter(model).prunable_modules(0)[0]
    m.set_weight(torch.zeros(m.out_features, m.in_features, dtype=torch.float32))
    assert m.module.weight.dtype == torch.bfloat16 and not m.module.weight.any()


def test_bare_backbone_is_accepted():
    model = BUILDERS["llama"]()
    adapter = get_adapter(model.model)
    assert adapter.layers_path == "layers"
    assert adapter.prunable_modules(1)[0].full_name == "layers.1.self_attn.q_proj"


def test_unknown_architecture_raises_clearly():
    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='bloom'.*supported: .*gpt2.*llama"):
        get_adapter(model)
    with pytest.raises(UnsupportedArchitectureError, match="not supported"):
        get_adapter(nn.Linear(2, 2))


def test_embeddings_and_head_are_never_prunable():
    for arch, build in BUILDERS.items():
        model = build()
        chosen = {m.module for m in select_modules(model)}
        head = model.get_output_embeddings()
        assert head not in chosen
        assert not any(isinstance(m, nn.Embedding) for m in chosen)
        # every Linear/Conv1D inside the layers is offered, nothing else
        adapter = get_adapter(model)
        inside = {mod for mod in adapter.layers.modules() if isinstance(mod, (nn.Linear, Conv1D))}
        assert chosen == inside, arch


def test_targets_and_skip_selection():
    model = BUILDERS["llama"]()
    mlp = select_modules(model, targets=["mlp"])
    assert {m.name for m in mlp} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(mlp) == 3 * 3
    rest = select_modules(model, skip=[r"layers\.0\.", r"down_proj$"])
    assert {m.layer for m in rest} == {1, 2}
    assert "mlp.down_proj" not in {m.name for m in rest}
    assert len(rest) == 2 * 6
    with pytest.raises(ValueError, match="select no module.*self_attn.q_proj"):
        select_modules(model, targets=["nothing_like_this"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_modules(model, targets=["("])
    with pytest.raises(ValueError, match="must be a list"):
        select_modules(model, targets="mlp")


def test_gemma3_multimodal_prunes_only_the_language_layers():
    text = Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    adapter = get_adapter(model)
    assert adapter.layers_path == "model.language_model.layers"
    chosen = select_modules(model)
    assert len(chosen) == 2 * 7
    assert all(m.full_name.startswith("model.language_model.layers.") for m in chosen)
    vision_linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and "vision" in n]
    assert vision_linears and not set(vision_linears) & {m.full_name for m in chosen}
