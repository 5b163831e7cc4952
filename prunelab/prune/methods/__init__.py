"""Pruning methods: one small file each, registered by name in ``METHODS``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from prunelab.prune.methods.base import PruningMethod
from prunelab.prune.methods.magnitude import MagnitudePruning
from prunelab.prune.methods.random import RandomPruning
from prunelab.prune.methods.sparsegpt import SparseGPTPruning
from prunelab.prune.methods.wanda import WandaPruning

METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (MagnitudePruning, WandaPruning, SparseGPTPruning, RandomPruning)
}


def method_params(cls: type[PruningMethod]) -> dict[str, Any]:
    """The knobs a method accepts, with their defaults."""
    signature = inspect.signature(cls.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: param.default for name, param in signature.parameters.items() if name != "self" and param.kind in kinds
    }


def build_method(name: str, params: Mapping[str, Any] | None = None) -> PruningMethod:
    """Instantiate a method from its config (``method.name``, ``method.params``).

    Raises:
        ValueError: for an unknown name (lists the known ones; ``dense`` means "do not prune" and
            has no method object) or an unknown parameter (lists the method's parameters).
    """
    if name not in METHODS:
        hint = " ('dense' means no pruning: the runner skips the engine for it)" if name == "dense" else ""
        raise ValueError(f"method={name!r} has no pruning method{hint}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    params = dict(params or {})
    known = method_params(cls)
    unknown = sorted(set(params) - set(known))
    if unknown:
        accepted = ", ".join(f"{key} (default {value!r})" for key, value in known.items()) or "none"
        raise ValueError(f"method={name} does not take parameter(s) {', '.join(unknown)}; it accepts: {accepted}")
    return cls(**params)


__all__ = ["METHODS", "PruningMethod", "build_method", "method_params"]
