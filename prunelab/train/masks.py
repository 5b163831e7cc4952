"""Keep-masks that hold through training: a pruned weight is never revived.

Two guards, both needed: the gradient of a pruned entry is zeroed by a hook as it is computed, so
AdamW's moments of that entry stay exactly zero (and its update is 0 / (0 + eps) = 0); and after
every optimizer step the mask is multiplied in again, which also undoes anything else that could
touch the weight (weight decay of a zero is zero, but a custom optimizer might not be so kind).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class MaskGuard:
    """Hold ``masks`` (parameter name → keep-mask, True = kept) on ``model`` while training.

    Use as a context manager: hooks are removed on exit. Call :meth:`reapply` after each step.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [name for name in masks if name not in params]
        if missing:
            raise KeyError(f"keep-masks name parameters the model does not have (first: {missing[0]!r})")
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            param = params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter {tuple(param.shape)}")
            self.pairs.append((param, mask.to(device=param.device, dtype=torch.bool)))
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "MaskGuard":
        self.reapply()
        for param, mask in self.pairs:
            if param.requires_grad:
                self._hooks.append(param.register_hook(lambda grad, keep=mask: grad * keep.to(grad.dtype)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @torch.no_grad()
    def reapply(self) -> None:
        """Set every pruned entry to exactly zero again."""
        for param, mask in self.pairs:
            param.mul_(mask.to(param.dtype))

    def pruned_count(self) -> int:
        return sum(int((~mask).sum()) for _, mask in self.pairs)
