"""Where a causal LM keeps its decoder layers and which of their modules can be pruned.

One table row per architecture family (attribute paths, not code): the engine, the sparsity
report and mask I/O all walk a model through :class:`DecoderAdapter`, so a new dense
architecture is one more row in ``ARCHITECTURES``.

Prunable modules are the ``nn.Linear`` and GPT-2 ``Conv1D`` modules inside decoder layers;
embeddings and ``lm_head`` live outside the layers and are never offered. A ``Conv1D`` stores
its weight ``[in, out]``; :class:`PrunableModule` always hands it out and takes it back as
``[out, in]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no row in ``ARCHITECTURES``."""


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths of one architecture family.

    Attributes:
        backbone: path from the causal LM to the module whose forward embeds the tokens and runs
            the decoder layers (never the LM head).
        layers: path from the backbone to the ``nn.ModuleList`` of decoder layers.
        last_linear: name inside a layer of the Linear that runs last; its output only reaches
            the layer's output (the engine may skip computing it when that output is discarded).
    """

    backbone: str
    layers: str
    last_linear: str | None = None


_LLAMA_LIKE = ArchSpec(backbone="model", layers="layers", last_linear="mlp.down_proj")

# Keyed by ``config.model_type``.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,  # Llama 1-3, SmolLM2
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM (text-only checkpoints such as gemma-3-270m)
    "gemma3": ArchSpec(backbone="model.language_model", layers="layers", last_linear="mlp.down_proj"),
    "gpt2": ArchSpec(backbone="transformer", layers="h", last_linear="mlp.c_proj"),
    "opt": ArchSpec(backbone="model.decoder", layers="layers", last_linear="fc2"),
}

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


@dataclass
class PrunableModule:
    """One prunable module of a decoder layer.

    Attributes:
        layer: index of its decoder layer.
        name: name inside the layer (``self_attn.q_proj``, ``mlp.c_fc``).
        full_name: name inside the whole model, as ``model.named_modules()`` spells it.
        module: the ``nn.Linear`` or ``Conv1D``.
    """

    layer: int
    name: str
    full_name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """True when the module stores its weight ``[in, out]`` (GPT-2's Conv1D)."""
        return isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    def get_weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view of the parameter; do not modify it in place)."""
        weight = self.module.weight.detach()
        return weight.t() if self.transposed else weight

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Write ``weight`` ``[out, in]`` back in the module's own layout, dtype and device."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"{self.full_name}: new weight has shape {tuple(weight.shape)}, expected [out, in] = {expected}")
        self.module.weight.copy_(weight.t() if self.transposed else weight)


class DecoderAdapter:
    """A causal LM seen as: backbone → list of decoder layers → prunable modules."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture model_type={model_type!r} ({type(model).__name__}) is not supported; "
                f"supported: {', '.join(sorted(ARCHITECTURES))}. Add a row to ARCHITECTURES in "
                f"prunelab/models/adapters.py (backbone and layer-list attribute paths)"
            )
        self.model = model
        self.model_type: str = model_type
        self.spec = ARCHITECTURES[model_type]
        self.backbone_path = self._find_backbone(model, self.spec)
        self.backbone: nn.Module = _get_path(model, self.backbone_path)
        layers = _get_path(self.backbone, self.spec.layers)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: {self.layers_path!r} is a {type(layers).__name__}, expected nn.ModuleList"
            )
        self.layers: nn.ModuleList = layers

    @staticmethod
    def _find_backbone(model: nn.Module, spec: ArchSpec) -> str:
        """The backbone path; "" when ``model`` is itself the backbone (e.g. a bare ``LlamaModel``)."""
        for path in (spec.backbone, ""):
            try:
                _get_path(_get_path(model, path), spec.layers)
                return path
            except AttributeError:
                continue
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}) has no "
            f"decoder layers at {spec.backbone}.{spec.layers}; is it a causal LM of that family?"
        )

    @property
    def layers_path(self) -> str:
        """Dotted name of the layer list inside the model (``model.layers``, ``transformer.h``)."""
        return ".".join(p for p in (self.backbone_path, self.spec.layers) if p)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def prunable_modules(self, layer: int) -> list[PrunableModule]:
        """Every Linear/Conv1D of decoder layer ``layer``, in definition order."""
        prefix = f"{self.layers_path}.{layer}."
        return [
            PrunableModule(layer=layer, name=name, full_name=prefix + name, module=module)
            for name, module in self.layers[layer].named_modules()
            if name and isinstance(module, PRUNABLE_TYPES)
        ]

    def iter_prunable(self) -> Iterator[PrunableModule]:
        for layer in range(self.num_layers):
            yield from self.prunable_modules(layer)


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``; raises UnsupportedArchitectureError naming the supported families."""
    return DecoderAdapter(model)


def _compile(patterns: Sequence[str], key: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        raise ValueError(f"{key} must be a list of regexes, got the string {patterns!r}; write {key}=[{patterns!r}]")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(str(pattern)))
        except re.error as err:
            raise ValueError(f"{key}: {pattern!r} is not a valid regular expression ({err})") from None
    return compiled


def select_modules(
    model: nn.Module, targets: Sequence[str] = (".*",), skip: Sequence[str] = ()
) -> list[PrunableModule]:
    """The prunable modules chosen by ``targets`` and not excluded by ``skip``.

    Args:
        model: a supported causal LM.
        targets: regexes searched (``re.search``) in a module's name inside its layer
            (``self_attn.q_proj``); a module is a target when any matches.
        skip: regexes searched in the full module name (``model.layers.0.mlp.down_proj``);
            a module is dropped when any matches.

    Raises:
        ValueError: an invalid regex, or targets that select nothing (the message lists the names).
    """
    target_res, skip_res = _compile(targets, "prune.targets"), _compile(skip, "prune.skip")
    adapter = get_adapter(model)
    everything = list(adapter.iter_prunable())
    chosen = [
        m
        for m in everything
        if any(r.search(m.name) for r in target_res) and not any(r.search(m.full_name) for r in skip_res)
    ]
    if not chosen and everything:
        names = sorted({m.name for m in everything})
        raise ValueError(
            f"prune.targets={list(targets)} with prune.skip={list(skip)} select no module; "
            f"module names inside a layer are: {', '.join(names)}"
        )
    return chosen
