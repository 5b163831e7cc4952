"""Save keep-masks or pruned weights as safetensors and put them back into a model.

Tensors are keyed by parameter name (``model.layers.0.mlp.down_proj.weight``) and stored in
the parameter's own layout (GPT-2's Conv1D: ``[in, out]``), so loading is a shape-checked copy
or an element-wise product, whatever the architecture. Files are written under a staging name and
renamed into place with the permissions of any new file (a symbolic link at the name is replaced,
never written through).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunelab.io.staging import replacing
from prunelab.models.adapters import select_modules

log = logging.getLogger(__name__)

MASKS_FORMAT = "prunelab-keep-masks"
WEIGHTS_FORMAT = "prunelab-pruned-weights"


def masks_from_model(model: nn.Module, targets: Sequence[str] = (".*",), skip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Keep-masks read off the weights (``weight != 0``) of the selected modules, on the CPU.

    A kept weight that happens to be exactly zero reads as pruned; prefer the masks the engine
    returns (``PruneReport.masks``) when they exist.
    """
    return {f"{m.full_name}.weight": (m.module.weight.detach() != 0).cpu() for m in select_modules(model, targets, skip)}


def _save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, file_format: str) -> None:
    with replacing(Path(path)) as partial:
        save_file(dict(tensors), os.fspath(partial), metadata={"format": file_format})


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write boolean keep-masks (True = kept) keyed by parameter name."""
    tensors = {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ValueError(f"mask {name!r} has dtype {mask.dtype}; keep-masks must be boolean (True = kept)")
        tensors[name] = mask.detach().cpu().contiguous()
    _save(tensors, path, MASKS_FORMAT)
    log.info("saved %d keep-masks to %s", len(tensors), path)


def save_pruned_weights(
    model: nn.Module, path: str | os.PathLike, targets: Sequence[str] = (".*",), skip: Sequence[str] = ()
) -> None:
    """Write the weights of the selected modules (dtype kept) keyed by parameter name."""
    tensors = {
        f"{m.full_name}.weight": m.module.weight.detach().cpu().contiguous() for m in select_modules(model, targets, skip)
    }
    _save(tensors, path, WEIGHTS_FORMAT)
    log.info("saved %d pruned weights to %s", len(tensors), path)


def _read(path: str | os.PathLike, expected_format: str) -> dict[str, torch.Tensor]:
    with safe_open(os.fspath(path), framework="pt") as handle:
        found = (handle.metadata() or {}).get("format")
    if found != expected_format:
        raise ValueError(f"{path} holds format={found!r}, expected {expected_format!r}; is it the right file?")
    return load_file(os.fspath(path))


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return _read(path, MASKS_FORMAT)


def _parameters(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(
            f"{len(missing)} tensors name parameters this model does not have (first: {missing[0]!r}); "
            "were they saved from another architecture?"
        )
    return {n: params[n] for n in names}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Multiply each named parameter by its keep-mask in place; returns how many were masked."""
    for name, param in _parameters(model, list(masks)).items():
        mask = masks[name]
        if mask.shape != param.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
        param.mul_(mask.to(param.device, param.dtype))
    return len(masks)


@torch.no_grad()
def load_pruned_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Copy saved pruned weights into ``model``; returns how many parameters were replaced."""
    tensors = _read(path, WEIGHTS_FORMAT)
    for name, param in _parameters(model, list(tensors)).items():
        if tensors[name].shape != param.shape:
            raise ValueError(f"saved {name} has shape {tuple(tensors[name].shape)}, the parameter {tuple(param.shape)}")
        param.copy_(tensors[name])
    return len(tensors)


def load_and_apply_masks(model: nn.Module, path: str | os.PathLike) -> int:
    """``apply_masks(model, load_masks(path))``."""
    return apply_masks(model, load_masks(path))
