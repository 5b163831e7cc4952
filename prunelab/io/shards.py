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

:func:`save_model_folder` saves an in-memory model (``save_pretrained``) into a folder that may hold
another model already: the other model's files (:data:`MODEL_FILE`: weights, index, config,
tokenizer files; nothing else) are removed first, so no stale index or single file of another shard
layout is left for a loader to pick up.

Both write files with the permissions of any new file (``0666 & ~umask``; safetensors alone would
give 0600) and never through a symbolic link: a link at a file's name is replaced, and an output
folder that is a link is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunelab.io.staging import remove_stale_staging, replacing, share_tree, staging_path, write_new

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.partial)?")  # what ShardWriter names its files
# The files of a model folder as transformers writes and reads them: weights (safetensors or .bin, one
# file or shards), their index, the config, generation settings and tokenizer files, and ShardWriter's
# partial files of these. Only names of this form are ever removed from a folder a model is saved into.
MODEL_FILE = re.compile(
    r"(?:(?:model|pytorch_model)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)"
    r"|(?:model\.safetensors|pytorch_model\.bin)\.index\.json"
    r"|config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
    r"|tokenizer\.model|vocab\.json|merges\.txt|added_tokens\.json|chat_template\.jinja|chat_template\.json)"
    r"(?:\.partial)?")

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """The folder holds no readable safetensors checkpoint, or cannot be written into."""


def _refuse_linked_folder(folder: Path) -> None:
    if folder.is_symlink():
        raise ShardError(f"{folder} is a symbolic link (to {os.readlink(folder)}); prunelab writes a model only into "
                         f"a real folder, never through a link: remove the link, or choose another run folder")


def _unlink_model_links(folder: Path) -> None:
    """Remove symbolic links directly in ``folder`` named like a model file or a partial file (their targets stay)."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() and (MODEL_FILE.fullmatch(entry.name) or entry.name.endswith(".partial")):
            log.warning("removing the symbolic link %s (to %s): a model is written here, never through a link",
                        entry, os.readlink(entry))
            entry.unlink()


def clear_model_files(folder: Path) -> list[str]:
    """Remove the model files (:data:`MODEL_FILE`) directly in ``folder``; returns their names.

    What another model saved there leaves (an index naming other shards, a single file beside new
    shards) would be read in place of, or mixed with, the new model. Links are removed, not followed;
    folders and files of any other name are left as they are.
    """
    removed = []
    for entry in sorted(folder.iterdir()):
        if MODEL_FILE.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
            removed.append(entry.name)
    if removed:
        log.info("removed %d files of the model %s held before (%s)", len(removed), folder, ", ".join(removed[:4]))
    return removed


def save_model_folder(model: Any, tokenizer: Any, folder: str | os.PathLike,
                      max_shard_size: int | str | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` (``save_pretrained``) into ``folder``, replacing any model there.

    The files are written into a staging folder beside ``folder`` and given the permissions of new
    files and folders; then the model files already in ``folder`` are removed (only those:
    :func:`clear_model_files`) and the new ones moved in (a link at a file's name is replaced, never
    written through). A ``folder`` that is a symbolic link is refused.

    Args:
        model: a transformers model (anything with ``save_pretrained``).
        tokenizer: its tokenizer, or None.
        folder: the output folder (created).
        max_shard_size: passed to ``save_pretrained`` (None: transformers' default).
    """
    folder = Path(folder)
    _refuse_linked_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(folder.parent)
    staged = staging_path(folder)
    staged.mkdir()
    try:
        model.save_pretrained(staged, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        share_tree(staged)
        if not folder.exists():
            staged.rename(folder)
            return folder
        clear_model_files(folder)
        for entry in sorted(staged.iterdir()):
            os.replace(entry, folder / entry.name)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return folder


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
        folder: the output folder (created; a finished checkpoint already there is refused, and so is
            a folder that is a symbolic link; links named like a model file in it are removed).
        shards: how many shards will be written (their names are ``model-0000k-of-0000n.safetensors``).
    """

    def __init__(self, folder: str | os.PathLike, shards: int):
        self.folder = Path(folder)
        _refuse_linked_folder(self.folder)
        if (self.folder / INDEX).exists() or (self.folder / SINGLE).exists():
            raise FileExistsError(f"{self.folder} already holds a checkpoint; choose another output folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        _unlink_model_links(self.folder)
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
        with replacing(path, path.with_name(path.name + ".partial")) as partial:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(partial),
                      metadata={"format": "pt"})
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
        with replacing(index, index.with_name(index.name + ".partial")) as partial:
            write_new(partial, json.dumps({"metadata": {"total_size": self.bytes_written},
                                           "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
            self._remove_strays()  # before the index: a folder that looks finished holds only what the index names
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
