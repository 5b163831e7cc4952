"""Resumable checkpoints of a run: tensors as safetensors, the position as JSON, in ``<run>/checkpoint/``.

A checkpoint is one ``state.json`` and the safetensors files it names: groups of tensors such as the
model's ``weights``, the keep-``masks``, the lottery's ``rewind`` weights, the ``optimizer`` moments of
an unfinished training, and the ``rng`` states. Each save is a new *generation*: its changed groups
are written to new files (``weights-3.safetensors``), then ``state.json`` is replaced atomically, then
files no generation names any more are removed (inside the checkpoint folder only). A run killed at
any moment therefore leaves the previous complete checkpoint or the new one, never a mix. A group
saved again with ``None`` keeps its earlier file (the rewind weights are written once).

Loading verifies before it trusts: the format, the fingerprint of the run's configuration (a
checkpoint of another configuration is refused, not resumed), the checksums of ``state.json``'s own
content (the step counters, the schedule's position, the optimizer's hyper-parameters: an edited
value is refused, not resumed from), and the size and sha256 of every file. A checkpoint folder that
is a symbolic link is refused (nothing is read or written through it), and files are written under
fresh names with the permissions of any new file (``0666 & ~umask``), never through a planted link.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunelab.io.checksums import seal, seal_problem, unsealed
from prunelab.io.shards import sha256_file
from prunelab.io.staging import replacing, write_new

log = logging.getLogger(__name__)

FORMAT = "prunelab-checkpoint"
VERSION = 2  # 2: state.json carries checksums of its content
STATE = "state.json"
_FILE = re.compile(r"^(?P<group>[a-z_]+)-(?P<generation>\d+)\.safetensors$")

Tensors = dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message says what to do."""


@dataclass
class Checkpoint:
    """What a save stored: the JSON ``state`` and the tensor groups (loaded on the CPU)."""

    state: dict[str, Any]
    tensors: dict[str, Tensors] = field(default_factory=dict)
    generation: int = 0


class CheckpointStore:
    """The checkpoint folder of one run, bound to the fingerprint of its configuration."""

    def __init__(self, folder: str | os.PathLike, config_fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = config_fingerprint
        self._files: dict[str, dict[str, Any]] = {}  # group -> {"file", "sha256", "bytes"} of the last generation
        self.generation = 0

    @property
    def state_path(self) -> Path:
        return self.folder / STATE

    def exists(self) -> bool:
        return self.state_path.is_file()

    def read_state(self) -> dict[str, Any] | None:
        """The last saved JSON state, checked against this run's configuration; None without a checkpoint.

        Reads no tensors: the runner calls it before the model loads (a wrong checkpoint stops early).
        """
        self._refuse_link()
        if not self.exists():
            return None
        remedy = self.remedy()
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {self.state_path} is unreadable ({error}); {remedy}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"{self.state_path} is not a {FORMAT} v{VERSION} file; {remedy}")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"the checkpoint in {self.folder} was written by a run with another configuration; "
                                  f"rerun with the same overrides to resume, or {remedy}")
        problem = seal_problem(state)
        if problem:
            raise CheckpointError(f"checkpoint {self.state_path} cannot be trusted: {problem}; {remedy}")
        state = unsealed(state)
        for entry in state["files"].values():  # the cheap checks now; sha256 in load()
            path = self.folder / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise CheckpointError(f"checkpoint file {path} is missing or has the wrong size; {remedy}")
        return state

    def remedy(self) -> str:
        """What a user does about a checkpoint that cannot be used (the options this run really has)."""
        return (f"delete {self.folder} to start this run again, run it with checkpoint.enabled=false (no resume, "
                f"no checkpoints), or choose another run folder (hydra.run.dir=...)")

    def _refuse_link(self) -> None:
        if self.folder.is_symlink():
            raise CheckpointError(f"{self.folder} is a symbolic link; prunelab reads and writes checkpoints only in "
                                  f"the run folder itself: remove the link, or run with checkpoint.enabled=false")

    def load(self) -> Checkpoint | None:
        """The last checkpoint, every file verified (size and sha256), tensors on the CPU."""
        state = self.read_state()
        if state is None:
            return None
        tensors: dict[str, Tensors] = {}
        for group, entry in state["files"].items():
            path = self.folder / entry["file"]
            problem = None
            if not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != entry["bytes"]:
                problem = f"has {path.stat().st_size} bytes, the checkpoint recorded {entry['bytes']}"
            elif sha256_file(path) != entry["sha256"]:
                problem = "does not match its recorded sha256"
            if problem:
                raise CheckpointError(f"checkpoint file {path} {problem}; {self.remedy()}")
            tensors[group] = load_file(os.fspath(path))
        self._files = dict(state["files"])
        self.generation = int(state["generation"])
        log.info("resuming from the checkpoint in %s (generation %d, saved %s)", self.folder, self.generation,
                 state.get("saved"))
        return Checkpoint(state=state["data"], tensors=tensors, generation=self.generation)

    def save(self, data: Mapping[str, Any], groups: Mapping[str, Tensors | None]) -> None:
        """Save a new generation: ``data`` (JSON) and each tensor group (``None``: keep the earlier file).

        Groups not named are dropped from the checkpoint (an unfinished training's optimizer state,
        once that training has finished).
        """
        started = time.perf_counter()
        self._refuse_link()
        self.folder.mkdir(parents=True, exist_ok=True)
        generation = self.generation + 1
        files: dict[str, dict[str, Any]] = {}
        for group, tensors in groups.items():
            if not re.fullmatch(r"[a-z_]+", group):
                raise ValueError(f"checkpoint group names are lowercase words, not {group!r}")
            if tensors is None:
                if group not in self._files:
                    raise ValueError(f"checkpoint group {group!r} was never saved, so it cannot be kept")
                files[group] = self._files[group]
                continue
            name = f"{group}-{generation}.safetensors"
            with replacing(self.folder / name, self.folder / (name + ".partial")) as partial:
                save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
                          os.fspath(partial), metadata={"format": FORMAT, "group": group})
                _fsync(partial)
                files[group] = {"file": name, "sha256": sha256_file(partial), "bytes": partial.stat().st_size}
        state = seal({"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "generation": generation,
                      "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, "data": data}, default=_json_default)
        _fsync(self.folder)  # the renamed tensor files are on disk before state.json names them
        with replacing(self.state_path, self.folder / (STATE + ".partial")) as partial:
            write_new(partial, json.dumps(state, indent=1))  # flushed to disk before the rename
        _fsync(self.folder)
        self._files, self.generation = files, generation
        self._remove_unnamed()
        log.info("checkpoint %d saved in %s (%.1f s)", generation, self.folder, time.perf_counter() - started)

    def _remove_unnamed(self) -> None:
        named = {entry["file"] for entry in self._files.values()}
        for path in self.folder.iterdir():
            stale_file = _FILE.match(path.name) and path.name not in named
            if stale_file or path.name.endswith(".partial"):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the checkpoint (its own files only; a folder holding anything else is left).

        ``state.json`` goes first: a kill halfway leaves no checkpoint rather than one naming
        missing files.
        """
        if self.folder.is_symlink():
            raise CheckpointError(f"{self.folder} is a symbolic link; prunelab deletes nothing outside the run folder")
        if not self.folder.is_dir():
            return
        self.state_path.unlink(missing_ok=True)
        for path in self.folder.iterdir():
            if _FILE.match(path.name) or path.name in (STATE, STATE + ".partial") or path.name.endswith(".partial"):
                path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            log.warning("left %s: it holds files that are not the checkpoint's", self.folder)


def _fsync(path: Path) -> None:
    """Flush a file's or folder's data to disk (a power loss cannot leave a renamed, empty file)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which JSON cannot store")


def rng_state() -> tuple[dict[str, Any], Tensors]:
    """The random generators' states: Python's as JSON, torch's (CPU and CUDA) as tensors."""
    import random

    version, internal, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    return {"python": [version, list(internal), gauss]}, tensors


def set_rng_state(data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Put back what :func:`rng_state` saved."""
    import random

    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Tensors]:
    """Split ``optimizer.state_dict()`` into JSON (hyper-parameters, non-tensor state) and tensors."""
    tensors: Tensors = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "plain": plain}, tensors


def optimizer_from_tensors(data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild the ``state_dict`` that :func:`optimizer_to_tensors` split."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in data["plain"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()}
              for group in data["param_groups"]]
    return {"state": state, "param_groups": groups}


def parameters(model: torch.nn.Module) -> Tensors:
    """The model's parameters by name (tied ones once), as they are: what a checkpoint's ``weights`` holds."""
    return {name: param.detach() for name, param in model.named_parameters()}


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy a checkpoint's ``weights`` into ``model``; the names must be exactly the model's."""
    params = dict(model.named_parameters())
    differ = sorted(set(params) ^ set(weights))[:1] or [n for n, p in params.items() if p.shape != weights[n].shape][:1]
    if differ:
        raise CheckpointError(f"the checkpoint's weights do not fit this model (first difference: {differ[0]}); "
                              f"delete the run folder's checkpoint/ to start again")
    for name, param in params.items():
        param.copy_(weights[name].to(param.device, param.dtype))
