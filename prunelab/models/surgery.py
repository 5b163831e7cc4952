"""Structured removal that really shrinks a model: attention heads, MLP neurons, whole decoder layers.

Each operation rebuilds the affected ``nn.Linear`` / GPT-2 ``Conv1D`` modules with only the kept rows
or columns (and bias entries), updates the attributes the attention forward reads, and finally
:func:`sync_config` writes the new widths into ``model.config``. The result is a smaller dense model:
fewer parameters, smaller matmuls.

What goes together (one table row per architecture family, ``UNITS``):

- a **query head** h: rows ``h*d:(h+1)*d`` of q, columns of the same range of o. With grouped-query
  attention (Llama, Qwen2, Gemma-3) the query heads of one KV group share its k/v rows: removing
  every query head of a group removes the group (its k and v rows); otherwise each remaining group
  must keep the same number of query heads (``num_key_value_groups`` is one number per layer).
  GPT-2 and OPT have one k/v head per query head: a head takes its q, k, v rows with it. RoPE, the
  q/k norms of Gemma-3 and Qwen3 (per head_dim) and the head dimension are untouched.
- an **MLP neuron** i: row i of gate and up (GPT-2 ``c_fc``, OPT ``fc1``) with its bias, column i of
  down (``c_proj``, ``fc2``).
- a **layer**: removed from the layer list; the others' ``layer_idx`` (the KV cache's index) are
  renumbered, and ``num_hidden_layers`` and ``layer_types`` (sliding / full attention per layer)
  follow.

When every layer keeps the same widths the config stays a standard one (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``num_hidden_layers``), so
``AutoModelForCausalLM.from_pretrained`` rebuilds the shrunk model from its saved folder. Otherwise
the per-layer widths are recorded in ``config.prunelab_widths`` for prunelab's loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunelab.models.adapters import PrunableModule, get_adapter


@dataclass(frozen=True)
class UnitSpec:
    """Names inside one decoder layer of the modules each unit spans.

    ``qkv`` is GPT-2's fused projection (Conv1D, outputs q | k | v); otherwise ``q``, ``k``, ``v``.
    ``grouped``: the family has ``num_key_value_heads`` (GQA) and an attention module that reads
    ``num_key_value_groups``; else it has ``num_heads`` (and GPT-2 ``split_size``).
    """

    attention: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    grouped: bool = True
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    mlp_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"


_LLAMA = UnitSpec(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                  o="self_attn.o_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj")
UNITS: dict[str, UnitSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma": _LLAMA, "gemma2": _LLAMA, "gemma3_text": _LLAMA,  # not multimodal gemma3: its widths live in text_config
    "gpt2": UnitSpec(attention="attn", qkv="attn.c_attn", o="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
                     grouped=False, heads_key="n_head", kv_heads_key=None, mlp_key="n_inner", layers_key="n_layer"),
    "opt": UnitSpec(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                    o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2", grouped=False, kv_heads_key=None,
                    mlp_key="ffn_dim"),
}


def unit_spec(model: nn.Module) -> UnitSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in UNITS:
        raise ValueError(f"structured removal does not know model_type={model_type!r}; known: {', '.join(sorted(UNITS))}")
    return UNITS[model_type]


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


def _out_features(module: nn.Module) -> int:
    return PrunableModule(0, "", "", module).out_features


@torch.no_grad()
def _slice(module: nn.Module, keep: torch.Tensor, side: str) -> nn.Module:
    """A new module of the same kind with only the ``keep`` outputs (``side="out"``) or inputs."""
    weight = module.weight
    keep = keep.to(weight.device)
    conv = isinstance(module, Conv1D)
    # Linear stores [out, in], Conv1D [in, out]
    dim = (1 if conv else 0) if side == "out" else (0 if conv else 1)
    new_weight = weight.index_select(dim, keep).clone()
    bias = module.bias
    new_bias = None if bias is None else (bias.index_select(0, keep).clone() if side == "out" else bias.clone())
    if conv:
        new = Conv1D(new_weight.shape[1], new_weight.shape[0])
    else:
        new = nn.Linear(new_weight.shape[1], new_weight.shape[0], bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.copy_(new_weight)
    if new_bias is not None:
        new.bias.copy_(new_bias)
    new.weight.requires_grad_(weight.requires_grad)
    if new_bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    return new


def _indices(count: int, removed: Iterable[int], what: str) -> tuple[list[int], torch.Tensor]:
    removed = sorted({int(i) for i in removed})
    if any(i < 0 or i >= count for i in removed):
        raise ValueError(f"{what} indices must lie in [0, {count}); got {removed}")
    if len(removed) == count:
        raise ValueError(f"removing all {count} {what} would leave nothing; keep at least one")
    keep = torch.tensor([i for i in range(count) if i not in set(removed)], dtype=torch.long)
    return removed, keep


# ------------------------------------------------------------------------------------------ heads

def attention_shape(model: nn.Module, layer: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of decoder layer ``layer`` as its weights are now."""
    spec = unit_spec(model)
    block = get_adapter(model).layers[layer]
    attn = _get(block, spec.attention)
    head_dim = int(attn.head_dim)
    if spec.qkv is not None:
        heads = _out_features(_get(block, spec.qkv)) // 3 // head_dim
        return heads, heads, head_dim
    heads = _out_features(_get(block, spec.q)) // head_dim
    kv_heads = _out_features(_get(block, spec.k)) // head_dim
    return heads, kv_heads, head_dim


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def remove_heads(model: nn.Module, layer: int, heads: Iterable[int]) -> None:
    """Remove query heads ``heads`` (indices in the layer's current numbering) of decoder layer ``layer``.

    GQA: a KV group loses its k/v rows when all its query heads go; the groups that stay must keep
    equally many query heads each (the attention repeats each k/v head a fixed number of times).
    """
    spec = unit_spec(model)
    block = get_adapter(model).layers[layer]
    attn = _get(block, spec.attention)
    num_heads, num_kv, head_dim = attention_shape(model, layer)
    removed, keep_heads = _indices(num_heads, heads, f"layer {layer} query heads")
    if not removed:
        return
    per_group = num_heads // num_kv
    kept_groups = [g for g in range(num_kv) if any(h // per_group == g for h in keep_heads.tolist())]
    kept_per_group = {g: sum(1 for h in keep_heads.tolist() if h // per_group == g) for g in kept_groups}
    if len(set(kept_per_group.values())) > 1:
        raise ValueError(f"layer {layer}: removing query heads {removed} leaves the KV groups with "
                         f"{list(kept_per_group.values())} query heads; every group that stays must keep the same "
                         f"number (remove one head per group, or whole groups)")
    q_rows = _head_rows(keep_heads.tolist(), head_dim)
    kv_rows = _head_rows(kept_groups if spec.grouped else keep_heads.tolist(), head_dim)
    if spec.qkv is not None:  # GPT-2: q | k | v side by side in one Conv1D
        width = num_heads * head_dim
        fused = torch.cat([q_rows, kv_rows + width, kv_rows + 2 * width])
        _set(block, spec.qkv, _slice(_get(block, spec.qkv), fused, "out"))
    else:
        _set(block, spec.q, _slice(_get(block, spec.q), q_rows, "out"))
        _set(block, spec.k, _slice(_get(block, spec.k), kv_rows, "out"))
        _set(block, spec.v, _slice(_get(block, spec.v), kv_rows, "out"))
    _set(block, spec.o, _slice(_get(block, spec.o), q_rows, "in"))
    new_heads = len(keep_heads)
    if spec.grouped:
        attn.num_key_value_groups = new_heads // len(kept_groups)
    else:
        attn.num_heads = new_heads
        if hasattr(attn, "split_size"):
            attn.split_size = new_heads * head_dim
        if hasattr(attn, "embed_dim"):
            attn.embed_dim = new_heads * head_dim


# ---------------------------------------------------------------------------------------- neurons

def mlp_width(model: nn.Module, layer: int) -> int:
    spec = unit_spec(model)
    return _out_features(_get(get_adapter(model).layers[layer], spec.mlp_in[0]))


def remove_neurons(model: nn.Module, layer: int, neurons: Iterable[int]) -> None:
    """Remove MLP neurons ``neurons`` of decoder layer ``layer`` (gate/up rows and down columns)."""
    spec = unit_spec(model)
    block = get_adapter(model).layers[layer]
    removed, keep = _indices(mlp_width(model, layer), neurons, f"layer {layer} MLP neurons")
    if not removed:
        return
    for name in spec.mlp_in:
        _set(block, name, _slice(_get(block, name), keep, "out"))
    _set(block, spec.mlp_out, _slice(_get(block, spec.mlp_out), keep, "in"))


# ----------------------------------------------------------------------------------------- layers

def remove_layers(model: nn.Module, layers: Iterable[int]) -> None:
    """Remove whole decoder layers; renumber the rest (KV cache index) and fix the layer count and
    ``layer_types`` in the config."""
    adapter = get_adapter(model)
    config = model.config
    count = adapter.num_layers
    removed, keep = _indices(count, layers, "decoder layers")
    if not removed:
        return
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this GPT-2 scales attention by 1/(layer_idx + 1): removing layers would change the "
                         "remaining layers' arithmetic")
    kept = [adapter.layers[i] for i in keep.tolist()]
    for index in reversed(range(count)):  # the same ModuleList object, now holding only the kept layers
        del adapter.layers[index]
    adapter.layers.extend(kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep.tolist()]
    spec = unit_spec(model)
    setattr(config, spec.layers_key, len(kept))


# ----------------------------------------------------------------------------------------- config

def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: query heads, key/value heads and MLP width, read off the weights."""
    out = []
    for layer in range(get_adapter(model).num_layers):
        heads, kv_heads, _ = attention_shape(model, layer)
        out.append({"heads": heads, "kv_heads": kv_heads, "mlp": mlp_width(model, layer)})
    return out


def sync_config(model: nn.Module) -> bool:
    """Write the shrunk widths into ``model.config``; True when they are uniform across layers (a
    standard config), False when they differ (recorded as ``config.prunelab_widths``)."""
    spec = unit_spec(model)
    config = model.config
    widths = layer_widths(model)
    setattr(config, spec.layers_key, len(widths))
    uniform = all(w == widths[0] for w in widths)
    if uniform:
        first = widths[0]
        if not spec.grouped and first["heads"] != getattr(config, spec.heads_key):
            # GPT-2 / OPT derive head_dim = hidden_size / heads: fewer heads cannot be written as a standard config
            uniform = False
        else:
            if spec.grouped:
                if getattr(config, "head_dim", None) is None:
                    config.head_dim = attention_shape(model, 0)[2]
                config.num_attention_heads = first["heads"]
                config.num_key_value_heads = first["kv_heads"]
            setattr(config, spec.mlp_key, first["mlp"])
    if uniform:
        if hasattr(config, "prunelab_widths"):
            del config.prunelab_widths
    else:
        config.prunelab_widths = widths
    return uniform


# ------------------------------------------------------------------------------- per-layer widths

def shrink_to(model: nn.Module, widths: Sequence[dict[str, int]]) -> None:
    """Shrink a freshly built model (standard widths) to recorded per-layer ``widths`` so a saved
    state dict of a non-uniformly pruned model fits it. Which units go does not matter: the weights
    are loaded afterwards. With GQA the last KV groups go first, then the last heads of each group."""
    adapter = get_adapter(model)
    if len(widths) != adapter.num_layers:
        raise ValueError(f"{len(widths)} recorded layer widths for a model of {adapter.num_layers} layers")
    for layer, target in enumerate(widths):
        heads, kv_heads, _ = attention_shape(model, layer)
        per_group = heads // kv_heads
        if unit_spec(model).grouped:
            keep_groups, keep_per_group = target["kv_heads"], target["heads"] // target["kv_heads"]
            removed = [g * per_group + i for g in range(kv_heads) for i in range(per_group)
                       if g >= keep_groups or i >= keep_per_group]
        else:
            removed = list(range(target["heads"], heads))
        remove_heads(model, layer, removed)
        remove_neurons(model, layer, range(target["mlp"], mlp_width(model, layer)))
