"""Per-layer results of a pre-pass over the unpruned model, shared by the jobs of a sweep.

OWL's allocation walks the whole model once before pruning to measure each layer's outlier ratio
(``prunelab.prune.allocation.owl_targets``): a full layer-by-layer forward over the calibration set.
Every OWL job of a sweep with the same model, calibration and method walks the same weights with the
same windows, so the ratios are the same numbers; the first job stores them under
``<cache_dir>/prepass/<key>.json`` and the others read them.

"Provably the same": the key hashes what the pass reads: the sha256 of all the model's weights *as
they are when the pass runs* (a fine-tuned or pruned model, as in an iterative schedule's later steps,
never matches the dense one), the calibration windows' fingerprint, the method and its parameters,
the statistics it asks for, the reduction (OWL's M), the batch size, device and dtype. A stored
file is trusted only when it holds exactly these parts and one value per layer, and its content
matches the checksums stored beside it (``prunelab.io.checksums``: an edited ratio is caught, and the
file named); anything else is recomputed and rewritten. The key and whether it was a hit are
recorded in the run's results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.io.checksums import seal, seal_problem
from prunelab.io.staging import remove_stale_staging, replacing, write_new

log = logging.getLogger(__name__)

FORMAT = 2  # 2: with checksums of the content


def parts_digest(parts: Mapping[str, Any]) -> str:
    """One sha256 of a key's parts (JSON with sorted keys; anything else by its ``str``): the caches' and the stream's keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the model's state dict (names, shapes, dtypes, bytes), in order.

    Not only the targeted Linears: norms, embeddings and modules left unpruned shape the inputs too.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class PrepassCache:
    """``<folder>/<key>.json`` files holding one value per decoder layer (None where nothing is targeted)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return parts_digest(parts)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, parts: dict[str, Any], count: int) -> list[float | None] | None:
        """The stored values for ``parts``, or None (absent, unreadable, or not exactly these parts)."""
        key = self.key(parts)
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            problem = seal_problem(stored)
            if problem:
                log.warning("pre-pass cache %s: %s; computing it again", path, problem)
                return None
            values = stored["values"]
            ok = (stored.get("format") == FORMAT and stored.get("parts") == json.loads(json.dumps(parts, default=str))
                  and isinstance(values, list) and len(values) == count
                  and all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in values))
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("pre-pass cache %s is unreadable (%s): computing it again", path, err)
            return None
        if not ok:
            log.warning("pre-pass cache %s does not hold what its key names: computing it again", path)
            return None
        return [None if v is None else float(v) for v in values]

    def save(self, parts: dict[str, Any], values: Sequence[float | None]) -> Path:
        """Write atomically (a temporary file renamed into place), with checksums of the content."""
        path = self.path(self.key(parts))
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.folder)
        with replacing(path) as tmp:
            write_new(tmp, json.dumps(seal({"format": FORMAT, "parts": parts, "values": list(values)})))
        return path
