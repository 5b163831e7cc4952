"""The shard writer: a finished folder holds exactly what its index names, loadable by plain safetensors."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from prunelab.io.shards import INDEX, ShardWriter


def test_a_finished_write_leaves_only_the_shards_its_index_names(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    # an earlier unfinished write of a model with another shard count, and a user's file
    stale = {name: torch.zeros(2) for name in ("a",)}
    for name in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        save_file(stale, str(out / name))
    (out / "model-00002-of-00003.safetensors.partial").write_bytes(b"cut short")
    (out / "notes-model-00001-of-00003.safetensors").write_bytes(b"not ours")
    (out / "README.md").write_text("kept")

    writer = ShardWriter(out, shards=2)
    first, second = {"w": torch.arange(4.0)}, {"b": torch.ones(3)}
    writer.write(first)
    writer.write(second)
    writer.finish()

    index = json.loads((out / INDEX).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "README.md",
         "notes-model-00001-of-00003.safetensors"])
    assert index["weight_map"] == {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert torch.equal(load_file(str(out / "model-00001-of-00002.safetensors"))["w"], first["w"])
    assert torch.equal(load_file(str(out / "model-00002-of-00002.safetensors"))["b"], second["b"])


def test_adopted_shards_of_an_interrupted_write_stay(tmp_path):
    out = tmp_path / "model"
    first = ShardWriter(out, shards=2)
    kept = {"w": torch.arange(4.0)}
    written = first.write(kept)  # then the process died
    again = ShardWriter(out, shards=2)
    again.adopt(written.name, kept, 16)
    again.write({"b": torch.ones(3)})
    again.finish()
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, "model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"])
    assert torch.equal(load_file(str(out / written.name))["w"], kept["w"])
