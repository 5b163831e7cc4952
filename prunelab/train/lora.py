"""LoRA with ``peft``: adapters on chosen Linear modules, merged back so the mask survives.

A merge adds B·A, which is dense, to every weight: merged naively, a pruned model is dense again.
``merge`` therefore re-applies the keep-masks after peft's merge, W ← M ⊙ (W + B·A).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.config.schema import LoraConfig as LoraSettings  # peft has a LoraConfig of its own
from prunelab.config.typed import typed


def unknown_targets(targets: Sequence[str], linear_names: Iterable[str]) -> list[str]:
    """Targets that match no Linear module name (peft matches a target against a name's last parts)."""
    names = list(linear_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def wrap(model: nn.Module, lora_cfg: LoraSettings | Mapping[str, Any]) -> nn.Module:
    """``model`` with LoRA adapters on ``lora_cfg.targets`` (base weights frozen).

    ``lora_cfg``: the ``finetune.lora`` block (``prunelab.config.schema.LoraConfig`` or a mapping of its fields).
    """
    from peft import LoraConfig, get_peft_model

    lora_cfg = typed(LoraSettings, lora_cfg, "finetune.lora")
    config = LoraConfig(r=lora_cfg.r, lora_alpha=float(lora_cfg.alpha),
                        lora_dropout=float(lora_cfg.dropout), target_modules=list(lora_cfg.targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@torch.no_grad()
def merge(peft_model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """Merge the adapters into the base weights and re-apply ``masks``: W ← M ⊙ (W + B·A)."""
    from prunelab.io.masks import apply_masks

    model = peft_model.merge_and_unload()
    if masks:
        apply_masks(model, masks)
    return model
