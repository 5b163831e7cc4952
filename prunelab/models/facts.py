"""What a run needs to know about a model before loading its weights: layer count, width, context.

Read from the model's config alone (a local ``config.json``, the hub's config, or a GGUF header), so
settings that depend on the model (explicit per-layer targets, calibration memory, evaluation context)
are checked in seconds, before minutes of loading or conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelFacts:
    """Shapes that settings are checked against."""

    num_layers: int
    hidden_size: int
    max_positions: int | None  # max_position_embeddings (None when the config has none)
    source: str  # where the facts were read from


def facts_of(config: Any, source: str) -> ModelFacts:
    """Facts from a transformers config (multimodal configs: their text model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = getattr(text, "max_position_embeddings", None)
    return ModelFacts(int(text.num_hidden_layers), int(text.hidden_size), int(max_positions) if max_positions else None, source)


def read_model_facts(
    model_cfg: Mapping[str, Any], gguf_path: Path | None = None, cache_dir: str | None = None
) -> ModelFacts | None:
    """The model's shapes from its config, or None when the config cannot be read without the weights.

    Args:
        model_cfg: the ``model`` node (``source``, ``path``, ``revision``, ``trust_remote_code``).
        gguf_path: the GGUF file of a ``gguf_package`` model: the config of its conversion in
            ``cache_dir`` when there is one (milliseconds), else the GGUF header (seconds).
        cache_dir: where converted models are kept.
    """
    from transformers import AutoConfig

    try:
        if model_cfg["source"] == "hf":
            path = Path(str(model_cfg["path"])).expanduser()
            location = str(path) if path.is_dir() else str(model_cfg["path"])
            config = AutoConfig.from_pretrained(
                location, revision=model_cfg.get("revision"), trust_remote_code=bool(model_cfg.get("trust_remote_code"))
            )
            return facts_of(config, location)
        if gguf_path is not None:
            converted = _converted_config(model_cfg, gguf_path, cache_dir)
            if converted is not None:
                return facts_of(AutoConfig.from_pretrained(str(converted.parent)), str(converted))
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            return facts_of(config, str(gguf_path))
    except Exception as err:  # offline hub id, unknown architecture: the load itself will say what is wrong
        log.debug("model config not readable before loading: %s", err)
    return None


def activation_bytes(facts: ModelFacts, nsamples: int, seqlen: int, dtype: str) -> int:
    """Bytes of one decoder layer's calibration inputs and outputs, which the engine holds at once."""
    return 2 * nsamples * seqlen * facts.hidden_size * _DTYPE_BYTES.get(dtype, 4)


def _converted_config(model_cfg: Mapping[str, Any], gguf_path: Path, cache_dir: str | None) -> Path | None:
    """``config.json`` of the cached conversion of ``gguf_path``, when it exists."""
    from prunelab.models.loading import cache_folder, sha256_file

    if not cache_dir or not gguf_path.is_file():
        return None
    config = cache_folder(str(model_cfg["name"]), sha256_file(gguf_path), cache_dir) / "config.json"
    return config if config.is_file() else None
