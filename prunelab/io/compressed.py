"""Bitmask-compressed safetensors: save a pruned model in roughly (1 - sparsity) of its dense size.

Layout of a file written by :func:`save_compressed` (an ordinary safetensors file):

* a sparse tensor ``name`` becomes two entries: ``name + BITMASK_SUFFIX``, a uint8 vector of
  ``ceil(numel / 8)`` bytes where bit ``i % 8`` (least significant first) of byte ``i // 8`` says
  whether element ``i`` of the row-major flattened tensor is stored, and ``name + VALUES_SUFFIX``, the
  stored elements in row-major order, in the tensor's own dtype;
* a tensor that would not get smaller (or is not floating point) is stored under its own name as is;
* the safetensors metadata holds, under ``METADATA_KEY``, a JSON object with the format version, the
  shape and dtype of every compressed tensor, and aliases (tied weights saved once).

An element is "zero" only when all of its bits are zero, so ``-0.0`` and NaN are stored as values and
the round trip is bit-exact for every dtype.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from prunelab.io.staging import replacing

log = logging.getLogger(__name__)

FORMAT = "prunelab-bitmask"
VERSION = 1
METADATA_KEY = "prunelab.compressed"
BITMASK_SUFFIX = "::bitmask"
VALUES_SUFFIX = "::values"

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened row-major) into uint8, least significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat boolean tensor of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def nonzero_mask(tensor: torch.Tensor) -> torch.Tensor:
    """True where an element has any bit set (so ``-0.0`` counts as non-zero, as does NaN)."""
    if tensor.dtype.is_floating_point:
        return tensor.view(_INT_VIEW[tensor.element_size()]) != 0
    return tensor != 0


def compressed_nbytes(numel: int, nnz: int, itemsize: int) -> int:
    """Bytes of tensor data a compressed tensor takes (bitmask + values), without the file header."""
    return math.ceil(numel / 8) + nnz * itemsize


def _state_dict_of(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return dict(model_or_state_dict.state_dict())
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    raise TypeError(f"save_compressed needs an nn.Module or a dict of tensors, got {type(model_or_state_dict).__name__}")


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _compressed_plan(state: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor | None, int]], dict]:
    """What :func:`save_compressed` stores: ``[(name, cpu tensor, nonzero mask or None, nnz)]`` and the metadata.

    A tensor with a mask is stored as bitmask + values; one without is stored as is; tied names
    are aliases (not in the list).
    """
    plan: list[tuple[str, torch.Tensor, torch.Tensor | None, int]] = []
    compressed: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if name.endswith((BITMASK_SUFFIX, VALUES_SUFFIX)):
            raise ValueError(f"tensor name {name!r} ends with a reserved suffix; rename it before saving")
        key = _storage_key(tensor)
        if key in seen:  # tied weights: store once, remember the alias
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype.is_floating_point and tensor.numel() > 0:
            mask = nonzero_mask(tensor)
            nnz = int(mask.sum())
            if compressed_nbytes(tensor.numel(), nnz, tensor.element_size()) < tensor.numel() * tensor.element_size():
                plan.append((name, tensor, mask, nnz))
                compressed[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                continue
        plan.append((name, tensor, None, tensor.numel()))
    meta = {"format": FORMAT, "version": VERSION, "tensors": compressed, "aliases": aliases, "order": list(state)}
    return plan, meta


def save_compressed(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict:
    """Write a bitmask-compressed safetensors file.

    Args:
        model_or_state_dict: a module (its ``state_dict()`` is saved) or a mapping name -> tensor.
        path: the file to write (parent folders are created; written under a staging name and renamed
            into place with the permissions of any new file, so a symbolic link at ``path`` is
            replaced, never written through).

    Returns:
        A summary: ``{"path", "bytes", "tensors", "compressed", "dense", "aliases"}`` (counts of tensors).
    """
    state = _state_dict_of(model_or_state_dict)
    plan, meta = _compressed_plan(state)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor, mask, _ in plan:
        if mask is None:
            tensors[name] = tensor
        else:
            tensors[name + BITMASK_SUFFIX] = pack_bits(mask)
            tensors[name + VALUES_SUFFIX] = tensor.reshape(-1)[mask.reshape(-1)].clone()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(Path(path)) as partial:
        save_file(tensors, os.fspath(partial), metadata={METADATA_KEY: json.dumps(meta)})
    summary = {
        "path": path,
        "bytes": os.path.getsize(path),
        "tensors": len(state),
        "compressed": len(meta["tensors"]),
        "dense": len(state) - len(meta["tensors"]) - len(meta["aliases"]),
        "aliases": len(meta["aliases"]),
    }
    log.info("wrote %s: %d bytes (%d compressed, %d dense tensors)", path, summary["bytes"], summary["compressed"],
             summary["dense"])
    return summary


def compressed_file_bytes(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Size in bytes of the file :func:`save_compressed` would write, computed without writing it."""
    plan, meta = _compressed_plan(_state_dict_of(model_or_state_dict))
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, tensor, mask, nnz in plan:
        if mask is None:
            entries[name] = (tensor.dtype, tuple(tensor.shape))
        else:
            entries[name + BITMASK_SUFFIX] = (torch.uint8, (math.ceil(tensor.numel() / 8),))
            entries[name + VALUES_SUFFIX] = (tensor.dtype, (nnz,))
    return safetensors_file_bytes(entries, {METADATA_KEY: json.dumps(meta)})


@functools.cache
def _safetensors_dtypes() -> dict[torch.dtype, tuple[int, str]]:
    """``{torch dtype: (rank, safetensors name)}``: the order in which safetensors lays tensors out.

    Read from the installed safetensors itself (one element of each dtype serialized in memory),
    so a change of its layout rules shows up here rather than as a wrong byte count.
    """
    candidates = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool]
    probe = {f"t{i}": torch.zeros(1, dtype=dtype) for i, dtype in enumerate(candidates)}
    raw = safetensors_save(probe)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    order = sorted((info["data_offsets"][0], key) for key, info in header.items() if key != "__metadata__")
    return {candidates[int(key[1:])]: (rank, header[key]["dtype"]) for rank, (_, key) in enumerate(order)}


def safetensors_file_bytes(entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                           metadata: Mapping[str, str] | None = None) -> int:
    """Bytes of the safetensors file holding tensors of these dtypes and shapes, computed without writing.

    The layout is safetensors': 8 bytes of header length, the JSON header (``__metadata__`` first,
    then each tensor's dtype, shape and data offsets; tensors ordered by dtype as safetensors orders
    them, then by name) padded with spaces to a multiple of 8, then the tensor data.

    Raises:
        KeyError: a dtype outside the usual float, int and bool types (write the file instead).
    """
    dtypes = _safetensors_dtypes()
    unknown = {str(dtype) for dtype, _ in entries.values() if dtype not in dtypes}
    if unknown:
        raise KeyError(f"no computed safetensors layout for dtypes {sorted(unknown)}")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(entries, key=lambda n: (dtypes[entries[n][0]][0], n)):
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": dtypes[dtype][1], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + text + (-text) % 8 + offset


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_compressed` back into a state dict with the original tensors.

    Tied weights come back as the same tensor under each of their names.
    """
    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: it was not written by prunelab.io.compressed.save_compressed")
        meta = json.loads(metadata[METADATA_KEY])
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}; "
                             f"this prunelab reads {FORMAT} version {VERSION}")
        state: dict[str, torch.Tensor] = {}
        for name, info in meta["tensors"].items():
            shape, dtype = info["shape"], _DTYPES[info["dtype"]]
            numel = math.prod(shape)
            mask = unpack_bits(handle.get_tensor(name + BITMASK_SUFFIX), numel)
            values = handle.get_tensor(name + VALUES_SUFFIX)
            if values.dtype != dtype or values.numel() != int(mask.sum()):
                raise ValueError(f"{path}: tensor {name!r} is corrupt (values do not match its bitmask)")
            flat = torch.zeros(numel, dtype=dtype)
            flat[mask] = values
            state[name] = flat.reshape(shape)
        for key in handle.keys():
            if not key.endswith((BITMASK_SUFFIX, VALUES_SUFFIX)):
                state[key] = handle.get_tensor(key)
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = state[target]
    order = meta.get("order") or list(state)
    state = {name: state[name] for name in order}
    if torch.device(device).type != "cpu":
        moved = {id(t): t.to(device) for t in state.values()}
        state = {name: moved[id(t)] for name, t in state.items()}
    return state
