"""The dense model's per-layer input statistics, shared by the non-sequential jobs of a sweep.

With ``prune.sequential=false`` every layer is calibrated on the *dense* model's activations, so
its statistics (Wanda's ‖X‖², SparseGPT's X Xᵀ, FLAP-style sums) do not depend on the sparsity,
the pattern or the allocation of the job: a sweep over those computes the same numbers in every job.
The first job stores them, one safetensors file per layer, under ``<cache_dir>/stats/<key>/``; the
next ones read them and run no forward pass at all.

"Provably the same": the key hashes what the statistics depend on: the sha256 of all the model's
weights as they are when the run starts (a fine-tuned or already pruned model never matches the
dense one), the calibration windows' fingerprint, the statistics asked for (``needs``), the batch
size, device and dtype, the targeted and skipped modules. An entry is written into a temporary
folder and renamed into place once complete, with ``manifest.json`` naming its parts and each
file's sha256; it is trusted only when the manifest holds exactly this run's parts and every file
hashes to its recorded value. Anything else is computed again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunelab.device import aligned
from prunelab.io.shards import sha256_file
from prunelab.io.checksums import seal, seal_problem
from prunelab.io.staging import remove_stale_staging, share_tree, staging_path
from prunelab.models.adapters import PrunableModule
from prunelab.prune.methods.base import InputStats
from prunelab.prune.prepass_cache import parts_digest

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
_FIELDS = ("sq_norm", "total", "hessian")


def _normalised(parts: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


class StatsEntry:
    """The statistics of one key: read back (``hit``), or being written layer by layer."""

    def __init__(self, cache: "StatsCache", parts: Mapping[str, Any], layers: int, manifest: dict[str, Any] | None):
        self.cache, self.parts, self.layers = cache, _normalised(parts), layers
        self.key = StatsCache.key(parts)
        self.hit = manifest is not None
        self.folder = cache.folder / self.key
        self._manifest = manifest
        self._files: dict[str, str] = {}
        self._meta: dict[str, Any] = {}  # layer → which modules share an input, tokens seen
        # a folder of this writer's own (unique across processes and hosts sharing the cache)
        self._tmp = None
        if not self.hit:
            remove_stale_staging(cache.folder)
            self._tmp = staging_path(self.folder)
            self._tmp.mkdir()

    def record(self) -> dict[str, Any]:
        return {"key": self.key, "hit": self.hit, "folder": str(self.folder)}

    # ---------------------------------------------------------------------------------- reading
    def load_layer(self, index: int, modules: Sequence[PrunableModule], needs: frozenset[str],
                   device: torch.device) -> dict[str, InputStats]:
        """Layer ``index``'s statistics for ``modules``, as the collector would have built them."""
        if not self.hit:
            raise RuntimeError("this entry is being written, not read")
        name = f"layer-{index}.safetensors"
        if name not in self._manifest["files"]:
            if modules:
                raise RuntimeError(f"stats cache {self.folder} has no statistics for layer {index}")
            return {}
        tensors = load_file(str(self.folder / name), device=str(device))
        meta = self._manifest["layers"][str(index)]
        stats: dict[str, InputStats] = {}
        for mod in modules:
            owner = meta["shared"].get(mod.name, mod.name)
            if owner in stats:
                stats[mod.name] = stats[owner]
                continue
            entry = InputStats(mod.in_features, needs, device)
            for field in _FIELDS:
                if getattr(entry, field) is not None:
                    # in fresh memory: a view into the file's buffer may send a solver down another code path
                    setattr(entry, field, aligned(tensors[f"{owner}.{field}"]))
            entry.ntokens = int(meta["ntokens"][owner])
            stats[owner] = stats[mod.name] = entry
        return stats

    # ---------------------------------------------------------------------------------- writing
    def save_layer(self, index: int, stats: Mapping[str, InputStats], shared: Mapping[str, str]) -> None:
        """Write layer ``index``'s statistics (each shared object once) into the pending entry.

        The cache is an optimisation: a write that fails (a full disk) drops the entry, not the run.
        """
        if self.hit:
            raise RuntimeError("this entry was read back; it is not written again")
        if self._tmp is None:  # dropped after a failed write
            return
        try:
            self._write_layer(index, stats, shared)
        except OSError as err:
            log.warning("stats cache: cannot write layer %d into %s (%s); this run goes on without caching", index,
                        self._tmp, err)
            self.discard()

    def _write_layer(self, index: int, stats: Mapping[str, InputStats], shared: Mapping[str, str]) -> None:
        tensors, ntokens = {}, {}
        for name, entry in stats.items():
            if name in shared:
                continue
            ntokens[name] = entry.ntokens
            for field in _FIELDS:
                value = getattr(entry, field)
                if value is not None:
                    tensors[f"{name}.{field}"] = value.detach().to("cpu").contiguous()
        file = f"layer-{index}.safetensors"
        save_file(tensors, str(self._tmp / file))
        self._files[file] = sha256_file(self._tmp / file)
        self._meta[str(index)] = {"shared": dict(shared), "ntokens": ntokens}

    def commit(self) -> None:
        """Write the manifest and move the entry into place (another job's identical entry wins)."""
        if self._tmp is None or not self._tmp.exists():
            return
        manifest = seal({"format": FORMAT, "parts": self.parts, "files": self._files, "layers": self._meta})
        try:
            share_tree(self._tmp)  # safetensors writes 0600: a shared cache gets the umask's permissions
            (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.replace(self._tmp, self.folder)
        except OSError:  # a complete entry is already there (a parallel job), or the disk is full: keep what is there
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def discard(self) -> None:
        """Remove a pending entry (the run failed before it was complete)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class StatsCache:
    """``<folder>/<key>/``: one complete entry per key (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        return parts_digest(parts)

    def open(self, parts: Mapping[str, Any], layers: int) -> StatsEntry:
        """The entry for ``parts``: a verified hit, or a fresh one to write."""
        folder = self.folder / self.key(parts)
        manifest = self._verified(folder, _normalised(parts)) if folder.is_dir() else None
        self.folder.mkdir(parents=True, exist_ok=True)
        if manifest is None and folder.exists():  # unverifiable: moved aside (a reader may hold it), then removed
            aside = staging_path(folder)  # removed by the next writer if this process dies first
            aside.mkdir()
            try:
                os.replace(folder, aside / folder.name)
            except OSError:
                pass  # another job moved it first
            shutil.rmtree(aside, ignore_errors=True)
        return StatsEntry(self, parts, layers, manifest)

    @staticmethod
    def _verified(folder: Path, parts: Any) -> dict[str, Any] | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            problem = seal_problem(manifest)  # the token counts and shared inputs are in no tensor's sha256
            if problem:
                log.warning("stats cache %s: %s: computing it again", folder / MANIFEST, problem)
                return None
            if manifest.get("format") != FORMAT or manifest.get("parts") != parts:
                log.warning("stats cache %s does not hold what its key names: computing it again", folder)
                return None
            for file, digest in manifest["files"].items():
                if sha256_file(folder / file) != digest:
                    log.warning("stats cache %s: %s does not match its recorded sha256: computing it again", folder, file)
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("stats cache %s is unreadable (%s): computing it again", folder, err)
            return None
        return manifest
