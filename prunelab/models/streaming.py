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

A run that stops part way is taken up where it stopped. After each layer's shard is in place the
output folder's ``stream-progress.json`` records the run's key (what the pruning depends on), the
shard's sha256 and what the engine noted for the layer. A later run with the same key calls
:meth:`~StreamedLayers.resume`: the finished layers whose shards still match their sha256 (a prefix
0..k-1) are not pruned again. The walk still runs them over the calibration batches, read from the
output when the pruning is sequential, to give layer k its inputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunelab.config.schema import ModelConfig
from prunelab.io.checksums import seal, seal_problem
from prunelab.io.shards import ShardReader, ShardWriter, sha256_file
from prunelab.io.staging import replacing, write_new
from prunelab.models.adapters import DecoderAdapter, get_adapter

log = logging.getLogger(__name__)

PROGRESS = "stream-progress.json"  # the finished layers of an unfinished output (removed once the index is written)

# Files of a model folder copied next to the output weights (tokenizer and generation settings).
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass
class StreamedModel:
    """A model skeleton and the checkpoint its weights are read from.

    Attributes:
        names: every tensor the model saves (its ``state_dict`` names, a tied head left out when the
            checkpoint has none) → that tensor's name in the checkpoint (the same, or without the
            ``base_model_prefix``, as older checkpoints such as GPT-2's store them).
    """

    model: nn.Module
    adapter: DecoderAdapter
    reader: ShardReader
    dtype: torch.dtype
    names: dict[str, str]

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."

    def outside_layers(self) -> list[str]:
        layers = self.adapter.layers_path + "."
        return [name for name in self.names if not name.startswith(layers)]


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


def open_streamed(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, head: bool = False,
                  trust_remote_code: bool = False) -> StreamedModel:
    """The model in ``folder`` (config.json + safetensors) with no decoder layer in memory.

    ``head``: also give the LM head (everything outside the backbone) real weights, for logits. A
    checkpoint stored in another dtype than ``dtype`` has its embeddings (and head) converted,
    which holds them in memory; in their own dtype they stay memory-mapped.

    Raises:
        prunelab.io.shards.ShardError: the folder holds no safetensors checkpoint, or lacks a tensor
            the model saves.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunelab.io.shards import ShardError

    folder = Path(folder)
    reader = ShardReader(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    adapter = get_adapter(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    names: dict[str, str] = {}
    missing = []
    for name in model.state_dict():
        if name in reader.weight_map:
            names[name] = name
        elif prefix != "." and name.startswith(prefix) and name[len(prefix):] in reader.weight_map:
            names[name] = name[len(prefix):]
        elif not (tied and name.startswith("lm_head.")):
            missing.append(name)
    if missing:
        raise ShardError(f"{folder}: the checkpoint has no tensor for {', '.join(missing[:3])}"
                         f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} (its names must be the model's, "
                         f"with or without the '{prefix[:-1]}.' prefix)")
    streamed = StreamedModel(model=model, adapter=adapter, reader=reader, dtype=dtype, names=names)
    backbone = adapter.backbone_path + "." if adapter.backbone_path else ""
    needed = [name for name in streamed.outside_layers() if head or name.startswith(backbone)]
    tensors = reader.read(names[name] for name in needed)
    for name in needed:
        _set_tensor(model, name, tensors.pop(names[name]), dtype)
    if tied:
        model.tie_weights()
    log.info("opened %s for streaming: %d decoder layers read one at a time (%s)", folder, adapter.num_layers, dtype)
    return streamed


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps the freed blocks of every layer's mid-sized temporaries (activations, scores) in its
    heap, fragmented: a 7B walk's resident memory grew by ~30 MB a layer (0.9 GB over 32 layers)
    until the heap is trimmed after each layer.
    """
    import ctypes
    import ctypes.util

    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim with
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


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
        # one shard per decoder layer, then one per tensor outside them (each converted on its own)
        shards = streamed.adapter.num_layers + len(streamed.outside_layers())
        self.writer = ShardWriter(self.out, shards) if self.out is not None else None
        self.written: set[int] = set()
        self.resident: set[int] = set()
        self.resident_max = 0
        self.zeros = 0
        self.count = 0
        self.done: dict[int, dict] = {}  # layers an interrupted run wrote, taken over by resume()
        self.replay_written = True  # load a taken-over layer from the output (its pruned weights)
        self._written_reader: ShardReader | None = None
        self._progress: dict | None = None  # stream-progress.json's content, once resume() gave the key
        self._notes: dict[int, dict] = {}

    def resume(self, key: str, replay_written: bool) -> dict[int, dict]:
        """Take over the layers an interrupted run of the same ``key`` finished in the output folder.

        Every layer written from here on is recorded under ``key``. Of the recorded layers, the prefix
        0..k-1 whose shards match their sha256 is taken over; the others are pruned and written
        again. A record of another key (another config, calibration or source) is replaced.

        Args:
            key: what the pruning depends on (``prunelab.prune.engine``), as one digest.
            replay_written: the walk's forward through a taken-over layer uses the written (pruned)
                weights, as sequential pruning does; else the source's.

        Returns:
            ``{layer index: what the engine noted for it}`` for the layers taken over.
        """
        if self.writer is None or self.out is None:
            raise RuntimeError("this residence writes nothing (out=None)")
        self.replay_written = replay_written
        self._progress = {"key": key, "layers": {}}
        path = self.out / PROGRESS
        try:
            record = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable (%s); every layer is pruned again", path, error)
            record = None
        problem = seal_problem(record) if record is not None else None
        if problem:  # the tallies and the engine's notes are in no shard's sha256
            log.warning("%s: %s; every layer is pruned again", path, problem)
            record = None
        if record is not None and record.get("key") != key:
            log.warning("%s was written by a run of another config, calibration or source; every layer is pruned again", path)
            record = None
        layers = (record or {}).get("layers", {})
        for index in range(self.streamed.adapter.num_layers):
            entry = layers.get(str(index))
            if entry is None:
                break
            shard = self.out / entry["file"]
            if not shard.is_file() or sha256_file(shard) != entry["sha256"]:
                log.warning("%s does not match its recorded sha256: layers %d and on are pruned again", shard, index)
                break
            self.writer.adopt(entry["file"], entry["tensors"], entry["bytes"])
            self.done[index] = entry
            self.written.add(index)
            self.zeros += entry["zeros"]
            self.count += entry["count"]
            self._progress["layers"][str(index)] = entry
        self._save_progress()
        if self.done:
            self._written_reader = ShardReader.from_map(
                self.out, {name: entry["file"] for entry in self.done.values() for name in entry["tensors"]})
            log.info("resuming the stream into %s: layers 0-%d were written by an interrupted run with the same key "
                     "(sha256 checked); pruning from layer %d", self.out, len(self.done) - 1, len(self.done))
        return {index: entry["engine"] for index, entry in self.done.items()}

    def note(self, index: int, info: dict) -> None:
        """What the engine wants back for layer ``index`` if the run is resumed (recorded with its shard)."""
        self._notes[index] = info

    def load(self, index: int, layer: nn.Module) -> None:
        """Read layer ``index``'s weights from the checkpoint into ``layer`` (on the CPU).

        A layer taken over by :meth:`resume` is read from the output instead, when ``replay_written``.
        """
        prefix = self.streamed.layer_prefix(index)
        names = list(layer.state_dict())
        if index in self.done and self.replay_written and self._written_reader is not None:
            stored = {name: prefix + name for name in names}
            tensors = self._written_reader.read(stored.values())
        else:
            stored = {name: self.streamed.names[prefix + name] for name in names}
            tensors = self.streamed.reader.read(stored.values())
        for name in names:
            _set_tensor(layer, name, tensors.pop(stored[name]), self.streamed.dtype)
        self.resident.add(index)
        self.resident_max = max(self.resident_max, len(self.resident))

    def release(self, index: int, layer: nn.Module, write: bool) -> None:
        """Put ``layer``'s saved tensors back on meta; first write them as the next output shard when ``write``.

        Non-persistent buffers (computed at construction, never saved) stay as they are.
        """
        from accelerate.utils import set_module_tensor_to_device

        try:
            if write and self.writer is not None and index not in self.done:
                if index in self.written:
                    raise RuntimeError(f"decoder layer {index} was written already; a walk that writes runs once")
                prefix = self.streamed.layer_prefix(index)
                state = {prefix + name: value for name, value in layer.state_dict().items()}
                zeros, count = self.zeros, self.count
                self._tally(state)
                path = self.writer.write(state)
                self.written.add(index)
                if self._progress is not None:
                    self._progress["layers"][str(index)] = {
                        "file": path.name, "sha256": sha256_file(path), "tensors": list(state),
                        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
                        "zeros": self.zeros - zeros, "count": self.count - count, "engine": self._notes.pop(index, {})}
                    self._save_progress()
        finally:
            for name in layer.state_dict():
                set_module_tensor_to_device(layer, name, "meta")
            self.resident.discard(index)
            _trim_heap()

    def release_outside(self) -> None:
        """Put the tensors outside the layers (embeddings, final norm, head) back on meta.

        The pruning walk needs them only to capture layer 0's inputs; held afterwards, the embedding
        rows the calibration touched stay mapped (up to the whole matrix, 0.8 GB at 7B).
        """
        from accelerate.utils import set_module_tensor_to_device

        model = self.streamed.model
        for name in self.streamed.outside_layers():
            set_module_tensor_to_device(model, name, "meta")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # a tied head still held the old (mapped) embedding matrix

    def finish(self) -> dict[str, object]:
        """Write the tensors outside the layers (one shard each), config, tokenizer files, then the index."""
        if self.writer is None or self.out is None:
            raise RuntimeError("this residence writes nothing (out=None)")
        num_layers = self.streamed.adapter.num_layers
        if len(self.written) != num_layers:
            raise RuntimeError(f"only {len(self.written)} of {num_layers} decoder layers were written")
        reader = self.streamed.reader
        outside = self.streamed.outside_layers()
        self.release_outside()  # the pruning is over: the skeleton lets go of its embeddings (and head)
        for name in outside:  # then each is read, converted, written and dropped on its own
            value = reader.read([self.streamed.names[name]])[self.streamed.names[name]]
            value = value.to(self.streamed.dtype) if value.is_floating_point() else value
            self._tally({name: value})
            self.writer.write({name: value})
            del value
        config = self.streamed.model.config
        config.dtype = self.streamed.dtype
        config.save_pretrained(self.out)
        for name in SIDE_FILES:
            if (reader.folder / name).is_file():
                shutil.copyfile(reader.folder / name, self.out / name)
        index = self.writer.finish()
        (self.out / PROGRESS).unlink(missing_ok=True)  # the index says it all now
        return {"source": str(reader.folder), "output": str(self.out), "index": str(index), "shards": self.writer.shards,
                "bytes_read": reader.bytes_read, "bytes_written": self.writer.bytes_written,
                "resident_layers_max": self.resident_max, "resumed_layers": len(self.done)}

    def _save_progress(self) -> None:
        path = self.out / PROGRESS
        # as every file of a run folder: umask permissions, never written through a planted link
        with replacing(path, path.with_name(path.name + ".partial")) as partial:
            write_new(partial, json.dumps(seal(self._progress)))

    def _tally(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for value in tensors.values():
            if value.is_floating_point():  # count_nonzero: no mask the size of the tensor
                self.zeros += value.numel() - int(torch.count_nonzero(value))
                self.count += value.numel()
