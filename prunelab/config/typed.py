"""The one way a config block becomes a typed object: the schema's dataclass, through OmegaConf.

The runner converts the composed config once (``run_config``) and hands its typed blocks
(``FinetuneConfig``, ``ScheduleConfig``, ``PruneEngineConfig``, ...) to the library, which reads
them by attribute. A library entry point also takes a plain mapping or a DictConfig (tests,
notebooks) and passes it through ``typed``: OmegaConf merges it over the schema's defaults, so an
unknown key or a value of the wrong type is refused in one line, the same way Hydra refuses it on
the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prunelab.config.schema import PrunelabConfig

T = TypeVar("T")


def typed(cls: type[T], value: T | Mapping[str, Any] | DictConfig | None, key: str, what: str = "") -> T:
    """``value`` as an instance of the schema dataclass ``cls``; None gives the defaults.

    Args:
        cls: a dataclass of ``prunelab.config.schema`` (``FinetuneConfig``, ``LatencyConfig``, ...).
        value: an instance of it (returned as is), a mapping or a DictConfig of some of its fields.
        key: the block's name in the config (``finetune``), for the error message.
        what: how the message names one of its settings (default ``a <key> setting``).

    Raises:
        ValueError: a key the schema does not define, or a value that does not convert to its type.
    """
    if isinstance(value, cls):
        return value
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in (value or {}) if k not in known)
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not {what or f'a {key} setting'}; known: {', '.join(known)}")
    try:
        if isinstance(value, DictConfig):  # interpolations resolve against the config it belongs to (${device})
            value = OmegaConf.to_container(value, resolve=True)
        node = OmegaConf.merge(OmegaConf.structured(cls), value if value is not None else {})
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        detail = str(error).splitlines()[0]
        raise ValueError(f"{key}: {detail}") from None


def run_config(cfg: DictConfig) -> PrunelabConfig:
    """The composed (and validated) run config as a ``PrunelabConfig``, interpolations resolved."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
