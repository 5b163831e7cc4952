"""A causal LM bigger than memory: its skeleton in memory, its decoder layers one at a time from disk.

:func:`open_streamed` builds the model from its ``config.json`` with every parameter on the meta
device (``accelerate.init_empty_weights``; buffers such as rotary tables are computed for real),
then gives real, memory-mapped weights to the backbone's modules outside the decoder layers
(embeddings, final norm): what computing layer 0's inputs needs. The LM head stays on meta unless
it is tied to the embeddings; pruning never runs it.

:class:`StreamedLayers` is the residence the layer conveyor (``prunelab.prune.walk``) asks for a
layer: :meth:`~StreamedLayers.load` reads layer i's tensors from the checkpoint (memory-mapped),
:meth:`~StreamedLayers.release` puts the layer back on meta, after writing it as one shard of the
output checkpoint when the walk leaves it final. So at most one decoder layer is ever resident, and
the output is written shard by shard while the walk goes (``prunelab.io.shards``).
:meth:`~StreamedLayers.finish` copies the tensors outside the layers and writes the index, the
config and the tokenizer files: the output then loads with plain ``from_pretrained``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunelab.config.schema import ModelConfig
from prunelab.io.shards import ShardReader, ShardWriter
from prunelab.models.adapters import DecoderAdapter, get_adapter

log = logging.getLogger(__name__)

# Files of a model folder copied next to the output weights (tokenizer and generation settings).
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass
class StreamedModel:
    """A model skeleton and the checkpoint its weights are read from."""

    model: nn.Module
    adapter: DecoderAdapter
    reader: ShardReader
    dtype: torch.dtype

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."


def source_folder(model_cfg: ModelConfig, cache_dir: str | os.PathLike) -> tuple[Path, dict[str, object]]:
    """The folder a ``model.stream=true`` run reads, and its provenance: ``model.path`` (a local
    folder), or the safetensors conversion of a packaged GGUF model in the cache (made once)."""
    if model_cfg.source == "gguf_package":
        from prunelab.models.loading import prepare_gguf_model

        cached = prepare_gguf_model(model_cfg, cache_dir)
        return cached.folder, {**cached.provenance(), "stream": str(cached.folder)}
    folder = Path(str(model_cfg.path)).expanduser()
    return folder, {"hf": str(folder), "stream": str(folder)}


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Give ``module``'s parameter or buffer ``name`` (dotted) the value ``value`` on the CPU."""
    from accelerate.utils import set_module_tensor_to_device

    if value.is_floating_point() and value.dtype != dtype:
        value = value.to(dtype)
    set_module_tensor_to_device(module, name, "cpu", value=value)


def open_streamed(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, head: bool = False) -> StreamedModel:
    """The model in ``folder`` (config.json + safetensors) with no decoder layer in memory.

    ``head``: also give the LM head (everything outside the backbone) real weights, for logits.

    Raises:
        prunelab.io.shards.ShardError: the folder holds no safetensors checkpoint, or lacks a tensor
            the model needs outside its layers.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunelab.io.shards import ShardError

    folder = Path(folder)
    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    adapter = get_adapter(model)
    layers = adapter.layers_path + "."
    backbone = adapter.backbone_path + "." if adapter.backbone_path else ""
    outside = [name for name in model.state_dict()
               if (head or name.startswith(backbone)) and not name.startswith(layers)]
    if getattr(config, "tie_word_embeddings", False):
        outside = [name for name in outside if name in reader.weight_map or not name.startswith("lm_head.")]
    missing = [name for name in outside if name not in reader.weight_map]
    if missing:
        raise ShardError(f"{folder}: the checkpoint lacks {', '.join(missing[:3])} (its tensor names must be the model's own)")
    for name, value in reader.read(outside).items():
        _set_tensor(model, name, value, dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    log.info("opened %s for streaming: %d decoder layers read one at a time (%s)", folder, adapter.num_layers, dtype)
    return StreamedModel(model=model, adapter=adapter, reader=reader, dtype=dtype)


class StreamedLayers:
    """The conveyor's residence for a streamed model: one decoder layer in memory at a time.

    Args:
        streamed: the skeleton and its checkpoint (:func:`open_streamed`).
        out: the folder the final layers are written into; None: nothing is written (a dry walk).

    Attributes:
        resident_max: the most decoder layers that were in memory at once (1 in a correct walk).
        zeros, count: zero entries and entries of every floating tensor written (the model-wide
            zero fraction of the output).
    """

    def __init__(self, streamed: StreamedModel, out: str | os.PathLike | None):
        self.streamed = streamed
        self.out = Path(out) if out is not None else None
        num_layers = streamed.adapter.num_layers
        self.writer = ShardWriter(self.out, num_layers + 1) if self.out is not None else None
        self.written: set[int] = set()
        self.resident: set[int] = set()
        self.resident_max = 0
        self.zeros = 0
        self.count = 0

    def load(self, index: int, layer: nn.Module) -> None:
        """Read layer ``index``'s weights from the checkpoint into ``layer`` (on the CPU)."""
        prefix = self.streamed.layer_prefix(index)
        names = list(layer.state_dict())
        tensors = self.streamed.reader.read(prefix + name for name in names)
        for name in names:
            _set_tensor(layer, name, tensors[prefix + name], self.streamed.dtype)
        self.resident.add(index)
        self.resident_max = max(self.resident_max, len(self.resident))

    def release(self, index: int, layer: nn.Module, write: bool) -> None:
        """Put ``layer`` back on meta; first write it as the next output shard when ``write``."""
        try:
            if write and self.writer is not None:
                if index in self.written:
                    raise RuntimeError(f"decoder layer {index} was written already; a walk that writes runs once")
                prefix = self.streamed.layer_prefix(index)
                state = {prefix + name: value for name, value in layer.state_dict().items()}
                self._tally(state)
                self.writer.write(state)
                self.written.add(index)
        finally:
            layer.to("meta")
            self.resident.discard(index)

    def finish(self) -> dict[str, object]:
        """Write the tensors outside the layers, the index, config and tokenizer files; what was done."""
        if self.writer is None or self.out is None:
            raise RuntimeError("this residence writes nothing (out=None)")
        num_layers = self.streamed.adapter.num_layers
        if len(self.written) != num_layers:
            raise RuntimeError(f"only {len(self.written)} of {num_layers} decoder layers were written")
        reader = self.streamed.reader
        source = reader.folder
        layers = self.streamed.adapter.layers_path + "."
        rest = reader.read(name for name in reader.names() if not name.startswith(layers))
        rest = {k: (v.to(self.streamed.dtype) if v.is_floating_point() else v) for k, v in rest.items()}
        self._tally(rest)
        self.writer.write(rest)
        del rest
        config = self.streamed.model.config
        config.dtype = self.streamed.dtype
        config.save_pretrained(self.out)
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, self.out / name)
        index = self.writer.finish()
        return {"source": str(source), "output": str(self.out), "index": str(index), "shards": self.writer.shards,
                "bytes_read": reader.bytes_read, "bytes_written": self.writer.bytes_written,
                "resident_layers_max": self.resident_max}

    def _tally(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for value in tensors.values():
            if value.is_floating_point():
                self.zeros += int((value == 0).sum())
                self.count += value.numel()
