"""What a run needs to know about a model before loading its weights: layer count, width, context.

Read from the model's config alone (a local ``config.json``, the hub's config, or a GGUF header), so
settings that depend on the model (explicit per-layer targets, calibration memory, evaluation context)
are checked in seconds, before minutes of loading or conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from prunelab.config.schema import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFacts:
    """Shapes that settings are checked against."""

    num_layers: int
    hidden_size: int
    max_positions: int | None  # max_position_embeddings (None when the config has none)
    learned_positions: bool  # a position table (GPT-2, OPT): no position past max_positions exists
    linear_names: tuple[str, ...] = ()  # full names of the Linear (and GPT-2 Conv1D) modules
    intermediate_size: int | None = None  # the MLP's width (None when the config does not say)
    vocab_size: int | None = None
    config: Any = field(default=None, compare=False, repr=False)  # the transformers config they were read from


def facts_of(config: Any) -> ModelFacts:
    """Facts from a transformers config (multimodal configs: their text model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = getattr(text, "max_position_embeddings", None)
    rotary = any(getattr(text, key, None) is not None for key in ("rope_parameters", "rope_scaling", "rope_theta"))
    width = next((getattr(text, key) for key in ("intermediate_size", "n_inner", "ffn_dim") if getattr(text, key, None)),
                 None)  # Llama-like, GPT-2 (None: 4 x hidden), OPT
    vocab = getattr(text, "vocab_size", None)
    return ModelFacts(int(text.num_hidden_layers), int(text.hidden_size), int(max_positions) if max_positions else None,
                      learned_positions=not rotary, linear_names=linear_module_names(config),
                      intermediate_size=int(width) if width else None, vocab_size=int(vocab) if vocab else None,
                      config=config)


def meta_model(config: Any) -> torch.nn.Module | None:
    """The model a config describes, built on the meta device (shapes only: no memory, milliseconds);
    None when transformers cannot build it from the config alone."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # remote code, unknown architecture: the checks that need it are skipped
        log.debug("no meta model for %s: %s", type(config).__name__, err)
        return None


def linear_module_names(config: Any) -> tuple[str, ...]:
    """Names of the Linear modules of the model a config describes (empty when it cannot be built)."""
    from transformers.pytorch_utils import Conv1D

    model = meta_model(config)
    if model is None:
        return ()
    return tuple(name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D)))


def read_model_facts(
    model_cfg: ModelConfig | Mapping[str, Any], gguf_path: Path | None = None, cache_dir: str | None = None
) -> ModelFacts | None:
    """The model's shapes from its config, or None when the config cannot be read without the weights.

    Args:
        model_cfg: the ``model`` block (``ModelConfig`` or a mapping of its fields).
        gguf_path: the GGUF file of a ``gguf_package`` model: the config of its conversion in
            ``cache_dir`` when there is one (milliseconds), else the GGUF header (seconds).
        cache_dir: where converted models are kept.
    """
    from transformers import AutoConfig

    from prunelab.config.schema import ModelConfig
    from prunelab.config.typed import typed
    from prunelab.data.sources import hub_offline, hub_reachable

    model_cfg = typed(ModelConfig, model_cfg, "model")
    try:
        if model_cfg.source == "hf":
            path = Path(str(model_cfg.path)).expanduser()
            location = str(path) if path.is_dir() else str(model_cfg.path)
            if not path.is_dir() and (hub_offline() or not hub_reachable()):
                return None  # a hub id with no hub: the load says what is wrong, once
            config = AutoConfig.from_pretrained(
                location, revision=model_cfg.revision, trust_remote_code=bool(model_cfg.trust_remote_code)
            )
            return facts_of(config)
        if gguf_path is not None:
            converted = _converted_config(model_cfg, gguf_path, cache_dir)
            if converted is not None:
                return facts_of(AutoConfig.from_pretrained(str(converted.parent)))
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            return facts_of(config)
    except Exception as err:  # offline hub id, unknown architecture: the load itself will say what is wrong
        log.debug("model config not readable before loading: %s", err)
    return None


def activation_bytes(facts: ModelFacts, nsamples: int, seqlen: int, dtype: torch.dtype) -> int:
    """Bytes of one decoder layer's calibration inputs and outputs, which the engine holds at once."""
    return 2 * nsamples * seqlen * facts.hidden_size * dtype.itemsize


def _converted_config(model_cfg: ModelConfig, gguf_path: Path, cache_dir: str | None) -> Path | None:
    """``config.json`` of the cached conversion of ``gguf_path``, when it exists."""
    from prunelab.models.loading import cache_folder, gguf_sha256

    if not cache_dir or not gguf_path.is_file():
        return None
    config = cache_folder(model_cfg.name, gguf_sha256(gguf_path), cache_dir) / "config.json"
    return config if config.is_file() else None
