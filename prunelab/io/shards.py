"""Sharded safetensors checkpoints read tensor by tensor and written shard by shard.

:class:`ShardReader` reads a checkpoint folder as ``save_pretrained`` writes it (one
``model.safetensors``, or shards named by ``model.safetensors.index.json``). Its tensors are
memory-mapped: a tensor costs memory only for the pages that are touched, and those pages are
given back when the tensor is freed. So a model much bigger than RAM can be read one group of
tensors (one decoder layer) at a time.

:class:`ShardWriter` writes the same layout: each call to :meth:`~ShardWriter.write` becomes one
complete shard file (written under a temporary name, then renamed), and
:meth:`~ShardWriter.finish` writes ``model.safetensors.index.json`` last. A folder without the index
is an unfinished write that no loader mistakes for a model; plain
``transformers.AutoModelForCausalLM.from_pretrained`` loads a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.partial)?")  # what ShardWriter names its files

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """The folder holds no readable safetensors checkpoint."""


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardReader:
    """The tensors of a (sharded) safetensors checkpoint, read on demand.

    Args:
        folder: a folder with ``model.safetensors.index.json`` and its shards, or one ``model.safetensors``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise ShardError(f"{index} is not a safetensors index ({error})") from None
        elif (self.folder / SINGLE).is_file():
            with safe_open(str(self.folder / SINGLE), framework="pt") as handle:
                weight_map = {name: SINGLE for name in handle.keys()}
        else:
            raise ShardError(f"{self.folder} has neither {INDEX} nor {SINGLE}; streaming reads safetensors checkpoints only")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise ShardError(f"{self.folder}: shards named by the index are missing: {', '.join(missing[:3])}")
        self.weight_map: dict[str, str] = dict(weight_map)
        self.bytes_read = 0

    @classmethod
    def from_map(cls, folder: str | os.PathLike, weight_map: Mapping[str, str]) -> "ShardReader":
        """A reader of the shards ``weight_map`` names (tensor → file) in ``folder``, which has no index yet."""
        reader = cls.__new__(cls)
        reader.folder, reader.weight_map, reader.bytes_read = Path(folder), dict(weight_map), 0
        return reader

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, memory-mapped (each shard opened once per call, closed before returning)."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise ShardError(f"{self.folder}: no tensor named {name!r}")
            by_file[self.weight_map[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
                    self.bytes_read += tensors[name].numel() * tensors[name].element_size()
        return tensors


class ShardWriter:
    """Writes a checkpoint shard by shard into ``folder``; the index is written by :meth:`finish`.

    :meth:`finish` also deletes the files of its own naming (``model-NNNNN-of-NNNNN.safetensors``, and
    ``.partial`` ones) in ``folder`` that the index does not name: what an earlier, unfinished write
    of another shard count left. Shards taken over with :meth:`adopt` are named, so they stay.

    Args:
        folder: the output folder (created; a finished checkpoint already there is refused).
        shards: how many shards will be written (their names are ``model-0000k-of-0000n.safetensors``).
    """

    def __init__(self, folder: str | os.PathLike, shards: int):
        self.folder = Path(folder)
        if (self.folder / INDEX).exists() or (self.folder / SINGLE).exists():
            raise FileExistsError(f"{self.folder} already holds a checkpoint; choose another output folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards = shards
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0
        self._next = 1

    def next_name(self) -> str:
        return f"model-{self._next:05d}-of-{self.shards:05d}.safetensors"

    def adopt(self, name: str, tensors: Iterable[str], nbytes: int) -> None:
        """Count the next shard as written: an interrupted write left it in place and the caller verified it."""
        if name != self.next_name() or not (self.folder / name).is_file():
            raise RuntimeError(f"{self.folder / name} is not the next shard ({self.next_name()}) or is missing")
        for key in tensors:
            self.weight_map[key] = name
        self.bytes_written += nbytes
        self._next += 1

    def write(self, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write ``tensors`` as the next shard (moved to the CPU, made contiguous); returns its path."""
        if self._next > self.shards:
            raise RuntimeError(f"{self.shards} shards were announced and all are written")
        name = self.next_name()
        clash = sorted(set(tensors) & set(self.weight_map))
        if clash:
            raise RuntimeError(f"tensors written twice: {clash[:3]}")
        path = self.folder / name
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(partial), metadata={"format": "pt"})
        partial.replace(path)
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.bytes_written += value.numel() * value.element_size()
        self._next += 1
        return path

    def finish(self) -> Path:
        """Write the index (after every shard): the checkpoint is complete and loadable from here on."""
        if self._next != self.shards + 1:
            raise RuntimeError(f"only {self._next - 1} of {self.shards} shards were written; the checkpoint is incomplete")
        index = self.folder / INDEX
        partial = index.with_name(index.name + ".partial")
        partial.write_text(json.dumps({"metadata": {"total_size": self.bytes_written},
                                       "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
        self._remove_strays()  # before the index: a folder that looks finished holds only what the index names
        partial.replace(index)
        return index

    def _remove_strays(self) -> None:
        """Delete shard files of an earlier, unfinished write into this folder that the index does not name.

        A resumed write of another model (another shard count) leaves them; only files with this
        writer's own naming, in its own folder, are touched.
        """
        kept = set(self.weight_map.values())
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and SHARD_NAME.fullmatch(path.name) and path.name not in kept:
                log.info("removing %s: an earlier unfinished write left it, and the index does not name it", path)
                try:
                    path.unlink(missing_ok=True)
                except OSError as err:  # the checkpoint is complete without it; it only takes space
                    log.warning("cannot remove %s (%s); the index does not name it, so no loader reads it", path, err)
