"""Read an offline W&B run file (``run-*.wandb``) without network: its config and summary.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version) followed by
LevelDB-log framing in 32 KiB blocks (4-byte CRC, 2-byte little-endian length, 1-byte chunk type:
1 full, 2 first, 3 middle, 4 last), each record a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_HEADER = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing ':W&B' header)")
    position, pending = _HEADER, b""
    while position + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, position)
        if length == 0 and kind == 0:  # zero padding at the end of a block
            position += left_in_block
            continue
        chunk = data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(run_file: str | Path) -> dict[str, Any]:
    """Return ``{"run_id", "config", "summary", "history"}`` of an offline run file: the summary with the last
    value of each key, the history as one dict per logged step (``run.log``), in the order written."""
    from wandb.proto import wandb_internal_pb2 as pb

    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    run_id = None
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return {"run_id": run_id, "config": config, "summary": summary, "history": history}
