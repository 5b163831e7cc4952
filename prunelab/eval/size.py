"""Model size: parameter counts, bytes on disk (dense and bitmask-compressed) and FLOPs per token."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Iterator

import torch
from safetensors.torch import save_model
from torch import nn

from prunelab.config.schema import KNOWN_SIZE_DISK_MODES
from prunelab.io.compressed import compressed_file_bytes, safetensors_file_bytes, save_compressed

log = logging.getLogger(__name__)

COMPRESSED_FILE = "model.compressed.safetensors"
FLOPS_COUNTING = (
    "forward FLOPs for one token = 2 x non-zero multiply-accumulates of every Linear weight (lm_head included; "
    "biases, norms, activations, rotary, softmax and the embedding lookup ignored) + attention 2 x 2 x n_heads x "
    "head_dim x keys per layer (QK^T and AV) for a token that attends to context_len keys "
    "(min(context_len, sliding_window) on sliding-window layers)"
)


def _linear_like_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:  # GPT-2 style Conv1D (weight laid out [in, out]); the count of MACs is the same
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear (and Conv1D) modules inside the decoder layers, by full name: what the engine may prune.

    Uses the engine's architecture adapter, so "prunable" means the same thing here and there.
    """
    from prunelab.models.adapters import get_adapter

    return {m.full_name: m.module for m in get_adapter(model).iter_prunable()}


def _unique_parameters(modules: Iterator[nn.Module] | list[nn.Module]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for module in modules:
        weight = module.weight
        if id(weight) not in seen:
            seen.add(id(weight))
            out.append(weight)
    return out


def _count(tensors: list[torch.Tensor]) -> dict[str, Any]:
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors)
    return {"total": total, "nonzero": nonzero, "sparsity": 1.0 - nonzero / total if total else 0.0}


@torch.no_grad()
def count_parameters(model: nn.Module, linear_names: list[str] | None = None) -> dict[str, Any]:
    """Total and non-zero parameters of the whole model (tied weights counted once) and of the prunable weights.

    Args:
        model: any module.
        linear_names: full names of the prunable Linear modules; default: every Linear inside the decoder layers.

    Returns:
        ``{"total", "nonzero", "sparsity", "prunable": {"total", "nonzero", "sparsity", "modules"}}``.
    """
    overall = _count(list(model.parameters()))
    if linear_names is None:
        linears = prunable_linears(model)
    else:
        modules = dict(model.named_modules())
        missing = [name for name in linear_names if name not in modules]
        if missing:
            raise ValueError(f"linear_names not found in the model: {missing[:5]}")
        linears = {name: modules[name] for name in linear_names}
    prunable = _count(_unique_parameters(list(linears.values())))
    prunable["modules"] = len(linears)
    return {**overall, "prunable": prunable}


def _attention_shape(model: nn.Module) -> tuple[int, int, int, list[int | None]]:
    """``(n_layers, n_heads, head_dim, per-layer window or None)`` from the model's text config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; FLOPs need num_attention_heads and num_hidden_layers")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:  # Mistral-style configs: a sliding_window without layer_types applies to every layer
        layer_types = ["sliding_attention" if window else "full_attention"] * n_layers
    windows = [window if kind == "sliding_attention" and window else None for kind in layer_types]
    return n_layers, n_heads, int(head_dim), windows


@torch.no_grad()
def flops_per_token(model: nn.Module, context_len: int) -> dict[str, Any]:
    """Theoretical forward FLOPs for one token of a causal LM (see ``FLOPS_COUNTING`` for what is counted).

    Args:
        model: a transformers causal LM (its config gives heads, head_dim, layers, sliding windows).
        context_len: number of keys the token attends to (the last token of a window of that length).

    Returns:
        ``{"context_len", "linear", "linear_dense", "attention", "total", "total_dense", "counting"}`` in FLOPs.
    """
    if context_len < 1:
        raise ValueError(f"context_len={context_len} must be a positive number of tokens")
    weights = _unique_parameters([m for m in model.modules() if isinstance(m, _linear_like_types())])
    counts = _count(weights)
    _, n_heads, head_dim, windows = _attention_shape(model)
    keys = [min(context_len, w) if w else context_len for w in windows]
    # structurally pruned models may keep a different number of query heads in each layer
    widths = getattr(model.config, "prunelab_widths", None)
    heads = [int(w["heads"]) for w in widths] if widths else [n_heads] * len(keys)
    attention = sum(2 * 2 * h * head_dim * k for h, k in zip(heads, keys))
    linear, linear_dense = 2 * counts["nonzero"], 2 * counts["total"]
    return {
        "context_len": context_len,
        "linear": linear,
        "linear_dense": linear_dense,
        "attention": attention,
        "total": linear + attention,
        "total_dense": linear_dense + attention,
        "counting": FLOPS_COUNTING,
    }


def dense_bytes(model: nn.Module, folder: str | os.PathLike) -> int:
    """Bytes of ``model.safetensors`` written by safetensors' ``save_model`` (tied weights once) into ``folder``."""
    path = os.path.join(folder, "model.safetensors")
    save_model(model, path)
    return os.path.getsize(path)


def dense_file_bytes(model: nn.Module) -> int:
    """Bytes :func:`dense_bytes` would write, computed without writing.

    Follows ``save_model``: tied weights are stored once under the name safetensors keeps, and each
    dropped name goes into the metadata.
    """
    from safetensors.torch import _remove_duplicate_names  # the choice save_model itself makes

    state = model.state_dict()
    metadata: dict[str, str] = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    entries = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()}
    return safetensors_file_bytes(entries, metadata or None)


def measure_size(model: nn.Module, cfg: Any = None, out_dir: str | os.PathLike | None = None,
                 context_len: int = 2048) -> dict[str, Any]:
    """Parameter counts, bytes on disk and FLOPs per token of a (pruned) model.

    Args:
        model: the model.
        cfg: ``SizeConfig`` (``save_compressed``: keep the compressed file in ``out_dir``; ``disk``:
            ``compute`` the bytes of both saves from the tensors' shapes, dtypes and non-zero counts,
            or ``write`` both files into a temporary folder and read their sizes); None = defaults.
        out_dir: the run folder; temporary files are written in a temporary folder inside it (or the system's).
        context_len: keys attended by the token whose FLOPs are counted (use the evaluation seqlen).

    Returns:
        ``{"params", "disk": {"dense_bytes", "compressed_bytes", "ratio", "compressed_path"}, "flops_per_token"}``.
    """
    keep = bool(getattr(cfg, "save_compressed", False)) if cfg is not None else False
    how = str(getattr(cfg, "disk", "compute")) if cfg is not None else "compute"
    if how not in KNOWN_SIZE_DISK_MODES:
        raise ValueError(f"size.disk={how!r} is not valid; use one of {', '.join(KNOWN_SIZE_DISK_MODES)}")
    if keep and out_dir is None:
        raise ValueError("size.save_compressed=true needs a run folder (out_dir) to write the compressed model into")
    params = count_parameters(model)
    flops = flops_per_token(model, context_len)
    target = os.path.join(out_dir, COMPRESSED_FILE) if keep else None
    if how == "compute":
        dense = dense_file_bytes(model)
        compressed = save_compressed(model, target)["bytes"] if keep else compressed_file_bytes(model)
    else:
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".size-") as tmp:
            dense = dense_bytes(model, tmp)
            compressed = save_compressed(model, target or os.path.join(tmp, COMPRESSED_FILE))["bytes"]
    disk = {
        "dense_bytes": dense,
        "compressed_bytes": compressed,
        "ratio": compressed / dense,
        "compressed_path": target,
        "measured_by": "written files" if how == "write" else "computed safetensors layout (no file written)",
        "format": "safetensors (dense) vs bitmask + non-zero values (prunelab.io.compressed)",
    }
    log.info("size: whole model (embeddings and lm_head included) %d of %d parameters non-zero (%.2f%% zero); "
             "disk %d -> %d bytes compressed (x%.3f); %.3g FLOPs/token at %d",
             params["nonzero"], params["total"], 100 * params["sparsity"], dense, compressed, disk["ratio"],
             flops["total"], context_len)
    return {"params": params, "disk": disk, "flops_per_token": flops}
