"""results.json is atomic and only complete; the offline W&B reader handles multi-block records."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from prunelab.tracking.results import RESULTS_FILE, write_failure, write_json_atomic, write_results
from prunelab.tracking.wandb_logger import flatten
from prunelab.tracking.wandb_offline import _payloads


def test_results_are_written_complete_and_failure_goes_elsewhere(tmp_path):
    try:
        raise RuntimeError("boom")
    except RuntimeError as error:
        write_failure(tmp_path, {"name": "x"}, error)
    assert not (tmp_path / RESULTS_FILE).exists()
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
    write_results(tmp_path, {"name": "x", "metrics": {"a": 1}})
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["status"] == "complete"
    assert not (tmp_path / "failed.json").exists()


def test_atomic_write_leaves_the_old_file_when_serialisation_fails(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"ok": 1})

    class Unserialisable:
        def __str__(self):
            raise ValueError("cannot serialise")

    with pytest.raises(ValueError):
        write_json_atomic(target, {"bad": Unserialisable()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert list(tmp_path.iterdir()) == [target], "no temporary file may stay behind"


def test_flatten_keeps_scalars_with_slash_keys():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": {"e": "x"}}, "f": None}) == {"a/b": 1, "a/d/e": "x", "f": None}


def _frame(records: list[bytes]) -> bytes:
    """LevelDB-log framing written independently of the reader: 32 KiB blocks, chunks split across them."""
    out = bytearray(b":W&B\xe1\xbe\x00")
    block = 32 * 1024
    for record in records:
        first = True
        while True:
            room = block - len(out) % block
            if room < 7:
                out += b"\x00" * room
                continue
            take = min(room - 7, len(record))
            chunk, record = record[:take], record[take:]
            kind = (1 if first else 4) if not record else (2 if first else 3)
            out += struct.pack("<IHB", zlib.crc32(chunk), len(chunk), kind) + chunk
            first = False
            if not record:
                break
    return bytes(out)


def test_offline_reader_reassembles_records_across_blocks():
    records = [bytes([i % 251]) * size for i, size in enumerate([10, 40_000, 32_750, 5, 70_000, 1])]
    assert list(_payloads(_frame(records))) == records
