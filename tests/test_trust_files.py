"""What prunelab reads back is verified, and what it writes is shareable and never written through a link.

Issue #21, items 4 and 8:
- every non-tensor value a cache or checkpoint keeps (OWL ratios, a checkpoint's step counter, the
  statistics cache's token counts, a stream's per-layer tallies) is covered by a checksum: edited on
  disk (still valid JSON), it is recomputed (caches) or refused with the remedy (checkpoints);
- files written into caches and run folders get ``0666 & ~umask`` and folders ``0777 & ~umask``;
- a model saved into a folder holding another model (another shard layout) replaces it whole;
- a symbolic link planted where prunelab writes is never written through.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prunelab.io import checkpoint as ckpt
from prunelab.io.compressed import load_compressed, save_compressed
from prunelab.io.masks import load_masks, save_masks
from prunelab.io.shards import INDEX, SINGLE, ShardReader, ShardWriter
from prunelab.models import loading, surgery
from prunelab.prune.engine import prune_model, prune_streamed
from prunelab.prune.methods import build_method
from prunelab.prune.prepass_cache import PrepassCache
from prunelab.steps import save_model
from tiny_models import random_ids, tiny_llama

OUTSIDE_TEXT = b"a file outside the cache and the run folder: never to be written\n"


# --------------------------------------------------------------------------------- helpers


def _edit_json(path: Path, change) -> None:
    """Change a value of a JSON file in place; the file stays valid JSON."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def _outside(tmp_path: Path, name: str = "victim.bin") -> Path:
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    target = folder / name
    target.write_bytes(OUTSIDE_TEXT)
    return target


def _plant_link(at: Path, target: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tokenizer():
    """A one-word tokenizer: the loaders want one in a model folder, the tests none of its words."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))


def _modes(folder: Path) -> dict[str, int]:
    """Permission bits of ``folder`` and of everything in it, by path relative to ``folder``'s parent."""
    found = {folder.name: stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[path.relative_to(folder.parent).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.fixture
def umask():
    """Run a test under a chosen umask, and put the process's back afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


# ------------------------------------------------------------- item 4: verified non-tensor values


def test_an_edited_owl_ratio_is_named_and_recomputed(tmp_path, caplog):
    cache = PrepassCache(tmp_path / "prepass")
    parts = {"weights": "0" * 64, "windows": "w", "method": "wanda"}
    computed = [0.125, None, 0.25, 0.0625]
    path = cache.save(parts, computed)
    assert cache.load(parts, 4) == computed  # an untouched file is read back

    def edit(data):
        data["values"][2] = 0.5  # a plausible ratio: the format and the count still fit

    _edit_json(path, edit)
    with caplog.at_level(logging.WARNING, logger="prunelab.prune.prepass_cache"):
        assert cache.load(parts, 4) is None, "an edited ratio was served from the cache"
    said = caplog.text
    assert str(path) in said and "'values'" in said and "computing it again" in said


def test_an_edited_ratio_is_recomputed_by_the_engine(tmp_path):
    dense, ids = tiny_llama(num_hidden_layers=2), random_ids(nsamples=2, seqlen=16)
    owl = {"name": "owl", "lam": 0.08, "m": 2.0}

    def run(model):
        return prune_model(model, build_method("wanda"), ids, 0.5, "unstructured", owl, {"device": "cpu"},
                           cache_dir=tmp_path)

    uncached = prune_model(copy.deepcopy(dense), build_method("wanda"), ids, 0.5, "unstructured", owl,
                           {"device": "cpu"}, cache_dir=None)
    first = run(copy.deepcopy(dense))
    path = tmp_path / "prepass" / f"{first.prepass_cache['key']}.json"
    _edit_json(path, lambda data: data["values"].__setitem__(0, data["values"][0] * 3))
    again_model = copy.deepcopy(dense)
    again = run(again_model)
    assert again.prepass_cache["hit"] is False
    assert again.outlier_ratios == uncached.outlier_ratios and again.layer_targets == uncached.layer_targets


def _store(tmp_path: Path) -> ckpt.CheckpointStore:
    store = ckpt.CheckpointStore(tmp_path / "run" / "checkpoint", "f" * 64)
    store.save({"job": {"step": 2, "of": 5}, "training": {"optimizer_step": 7}},
               {"weights": {"w": torch.arange(6.0)}})
    return store


@pytest.mark.parametrize("edit", ["step", "optimizer_step", "generation"])
def test_an_edited_checkpoint_state_is_refused_with_the_remedy(tmp_path, edit):
    store = _store(tmp_path)
    assert store.read_state()["data"]["job"]["step"] == 2
    changes = {"step": lambda d: d["data"]["job"].__setitem__("step", 5),
               "optimizer_step": lambda d: d["data"]["training"].__setitem__("optimizer_step", 10),
               "generation": lambda d: d.__setitem__("generation", 7)}
    _edit_json(store.state_path, changes[edit])
    for read in (ckpt.CheckpointStore(store.folder, "f" * 64).read_state, ckpt.CheckpointStore(store.folder, "f" * 64).load):
        with pytest.raises(ckpt.CheckpointError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message and str(store.state_path) in message
        assert f"delete {store.folder}" in message and "checkpoint.enabled=false" in message


def test_a_saved_checkpoint_state_reads_back_as_saved(tmp_path):
    data = {"job": {"step": 2, "of": 5}, "lr": 1e-3, "betas": (0.9, 0.999), "loss": torch.tensor(2.5), "nan": float("nan")}
    store = ckpt.CheckpointStore(tmp_path / "c", "f" * 64)
    store.save(data, {"weights": {"w": torch.ones(3)}})
    loaded = ckpt.CheckpointStore(tmp_path / "c", "f" * 64).load()
    assert loaded.state["job"] == {"step": 2, "of": 5} and loaded.state["lr"] == 1e-3
    assert loaded.state["betas"] == [0.9, 0.999] and loaded.state["loss"] == 2.5
    assert loaded.state["nan"] != loaded.state["nan"]  # NaN survives (and its checksum holds)
    assert torch.equal(loaded.tensors["weights"]["w"], torch.ones(3))


def test_edited_token_counts_in_the_statistics_cache_are_recomputed(tmp_path, caplog):
    model, ids = tiny_llama(num_hidden_layers=2), random_ids(4, 16)

    def run():
        pruned = copy.deepcopy(model)
        report = prune_model(pruned, build_method("wanda", {}), ids, 0.5, "unstructured",
                             engine={"sequential": False}, cache_dir=tmp_path)
        return pruned, report

    first, report = run()
    manifest = tmp_path / "stats" / report.stats_cache["key"] / "manifest.json"

    def edit(data):
        counts = data["layers"]["0"]["ntokens"]
        counts[next(iter(counts))] *= 2  # a token count no tensor's sha256 covers

    _edit_json(manifest, edit)
    with caplog.at_level(logging.WARNING, logger="prunelab.prune.stats_cache"):
        again, report = run()
    assert report.stats_cache["hit"] is False and str(manifest) in caplog.text and "'layers'" in caplog.text
    assert _same_state(first, again)


class _Killed(RuntimeError):
    pass


def test_edited_layer_tallies_of_an_interrupted_stream_are_not_taken_over(tmp_path):
    source = tmp_path / "src"
    tiny_llama(num_hidden_layers=3).save_pretrained(source, max_shard_size="30KB")
    ids = random_ids(2, 16)
    reference = prune_streamed(source, tmp_path / "ref", build_method("sparsegpt", {}), ids, 0.5)

    method, calls = build_method("sparsegpt", {}), []
    original = method.prune

    def dies_in_the_third_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * 7 + 1:  # 7 Linears a layer
            raise _Killed
        return original(*args, **kwargs)

    method.prune = dies_in_the_third_layer
    with pytest.raises(_Killed):
        prune_streamed(source, tmp_path / "out", method, ids, 0.5)
    progress = tmp_path / "out" / "stream-progress.json"
    _edit_json(progress, lambda d: d["layers"]["0"].__setitem__("zeros", d["layers"]["0"]["zeros"] + 1000))
    report = prune_streamed(source, tmp_path / "out", build_method("sparsegpt", {}), ids, 0.5)
    assert report.streamed["resumed_layers"] == 0, "layers were taken over from an edited record"
    assert report.summary.model_fraction == reference.summary.model_fraction


# ------------------------------------------------------- item 8: permissions of what is written


@pytest.mark.parametrize("mask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o007, 0o660, 0o770)])
def test_written_files_and_folders_get_the_umasks_permissions(tmp_path, umask, monkeypatch, mask, file_mode,
                                                              folder_mode):
    umask(mask)
    # a converted model: the real conversion's writer (safetensors + JSON), on a tiny model
    tiny = tiny_llama(num_hidden_layers=2)

    def convert(gguf_path, folder):
        tiny.save_pretrained(folder)

    monkeypatch.setattr(loading, "convert_gguf_to_safetensors", convert)
    gguf = tmp_path / "src" / "a.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(os.urandom(4096))
    cache = tmp_path / "cache"
    converted = loading.prepare_packaged_model({"name": "m", "source": "gguf_package", "package": "unused",
                                                "gguf_file": "unused.gguf", "path": str(gguf), "sha256": None}, cache)
    # a statistics cache entry and an OWL pre-pass (one run fills both)
    ids = random_ids(2, 16)
    prune_model(copy.deepcopy(tiny), build_method("wanda", {}), ids, 0.5, "unstructured",
                {"name": "owl", "lam": 0.08, "m": 2.0}, engine={"sequential": False}, cache_dir=cache)
    # a saved model, a streamed one, masks, a compressed model, a checkpoint
    run = tmp_path / "run"
    save_model(tiny, _tokenizer(), run / "model")
    prune_streamed(converted, run / "streamed", build_method("magnitude", {}), None, 0.5)
    save_masks({"w": torch.ones(4, dtype=torch.bool)}, run / "masks.safetensors")
    save_compressed({"w": torch.zeros(64)}, run / "compressed.safetensors")
    ckpt.CheckpointStore(run / "checkpoint", "f" * 64).save({"step": 1}, {"weights": {"w": torch.ones(2)}})

    for folder in (converted, cache / "stats", cache / "prepass", run / "model", run / "streamed", run / "checkpoint"):
        modes = _modes(folder)
        assert any(name.endswith(".safetensors") or name.endswith(".json") for name in modes)
        for name, mode in modes.items():
            is_dir = (folder.parent / name).is_dir()
            assert mode == (folder_mode if is_dir else file_mode), f"{name}: {oct(mode)}"
    for name in ("masks.safetensors", "compressed.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == file_mode, name


# ----------------------------------------------- item 8: a model saved over another model's files


def _shrunk(seed: int) -> torch.nn.Module:
    """A tiny Llama whose layers have different MLP widths (read back only by prunelab's loader)."""
    model = tiny_llama(seed=seed, num_hidden_layers=2)
    surgery.remove_neurons(model, 0, range(seed + 1, seed + 9))
    assert surgery.sync_config(model) is False
    return model


def test_a_model_saved_over_a_sharded_one_loads_as_itself(tmp_path):
    """Another model's index and shards in <run>/model (a streamed run, another shard count) go first."""
    from prunelab.models.loading import load_model

    folder = tmp_path / "run" / "model"
    old = _shrunk(seed=1)
    old.save_pretrained(folder, max_shard_size="20KB")  # another model, sharded
    _tokenizer().save_pretrained(folder)
    assert (folder / INDEX).is_file()
    new = _shrunk(seed=2)
    save_model(new, _tokenizer(), folder)

    loaded, _ = load_model({"name": "saved", "source": "hf", "path": str(folder), "dtype": "float32"}, "cpu")
    assert _same_state(loaded, new), "prunelab's loader read another model's files"
    reader = ShardReader(folder)  # what streamed perplexity and streamed pruning read
    read, state = reader.read(reader.names()), new.state_dict()
    assert read and all(torch.equal(tensor, state[name]) for name, tensor in read.items())
    assert not (folder / INDEX).exists() and not list(folder.glob("model-*-of-*.safetensors"))


def test_a_sharded_model_saved_over_a_single_file_one_loads_as_itself(tmp_path):
    """The reverse: a stale model.safetensors beside new shards is what plain transformers reads first."""
    from prunelab.io.shards import save_model_folder
    from prunelab.models.loading import load_model

    folder = tmp_path / "run" / "model"
    old, new = tiny_llama(seed=1, num_hidden_layers=2), tiny_llama(seed=2, num_hidden_layers=2)
    save_model(old, _tokenizer(), folder)
    (folder / "README.md").write_text("the user's notes")
    (folder / "masks.safetensors").write_bytes(b"not a model file")
    assert (folder / SINGLE).is_file()
    save_model_folder(new, _tokenizer(), folder, max_shard_size="20KB")

    assert (folder / INDEX).is_file() and not (folder / SINGLE).exists()
    assert _same_state(AutoModelForCausalLM.from_pretrained(folder), new), "transformers read the old model"
    loaded, _ = load_model({"name": "saved", "source": "hf", "path": str(folder), "dtype": "float32"}, "cpu")
    assert _same_state(loaded, new)
    assert (folder / "README.md").read_text() == "the user's notes"  # never anything but model files
    assert (folder / "masks.safetensors").read_bytes() == b"not a model file"
    # and back to one file: the index and every shard of the sharded save are gone
    save_model_folder(old, _tokenizer(), folder)
    assert not (folder / INDEX).exists() and not list(folder.glob("model-*-of-*.safetensors"))
    assert _same_state(AutoModelForCausalLM.from_pretrained(folder), old)
    assert sorted(ShardReader(folder).names()) == sorted(load_file(str(folder / SINGLE)))


# ------------------------------------------------------------- item 8: never through a link


def test_a_saved_model_is_never_written_through_planted_links(tmp_path):
    run = tmp_path / "run"
    targets = {name: _outside(tmp_path, name) for name in ("config.json", SINGLE, "tokenizer.json", INDEX)}
    for name, target in targets.items():
        _plant_link(run / "model" / name, target)
    model = tiny_llama(num_hidden_layers=2)
    save_model(model, _tokenizer(), run / "model")
    for name, target in targets.items():
        assert target.read_bytes() == OUTSIDE_TEXT, f"{name} was written through its link"
        assert not (run / "model" / name).is_symlink()
    assert not (run / "model" / INDEX).exists()  # the planted index link was a model file: removed
    assert _same_state(AutoModelForCausalLM.from_pretrained(run / "model"), model)


def test_a_model_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "outside" / "models"
    elsewhere.mkdir(parents=True)
    _plant_link(tmp_path / "run" / "model", elsewhere)
    with pytest.raises(ValueError, match="symbolic link"):
        save_model(tiny_llama(num_hidden_layers=2), _tokenizer(), tmp_path / "run" / "model")
    with pytest.raises(ValueError, match="symbolic link"):
        ShardWriter(tmp_path / "run" / "model", shards=1)
    assert list(elsewhere.iterdir()) == []


def test_checkpoint_files_are_never_written_through_planted_links(tmp_path):
    folder = tmp_path / "run" / "checkpoint"
    planted = {name: _outside(tmp_path, name) for name in
               ("state.json.partial", "weights-1.safetensors.partial", "weights-1.safetensors", "state.json")}
    for name, target in planted.items():
        _plant_link(folder / name, target)
    store = ckpt.CheckpointStore(folder, "f" * 64)
    with pytest.raises(ckpt.CheckpointError):  # state.json is a link to a file that is no checkpoint
        store.read_state()
    store.save({"step": 1}, {"weights": {"w": torch.arange(3.0)}})
    for name, target in planted.items():
        assert target.read_bytes() == OUTSIDE_TEXT, f"{name} was written through its link"
    assert not store.state_path.is_symlink()
    assert torch.equal(ckpt.CheckpointStore(folder, "f" * 64).load().tensors["weights"]["w"], torch.arange(3.0))


def test_a_checkpoint_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "outside" / "ckpt"
    elsewhere.mkdir(parents=True)
    _plant_link(tmp_path / "run" / "checkpoint", elsewhere)
    store = ckpt.CheckpointStore(tmp_path / "run" / "checkpoint", "f" * 64)
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        store.save({"step": 1}, {"weights": {"w": torch.ones(2)}})
    with pytest.raises(ckpt.CheckpointError, match="symbolic link"):
        store.read_state()
    assert list(elsewhere.iterdir()) == []


def test_shards_masks_and_compressed_files_are_never_written_through_links(tmp_path):
    run = tmp_path / "run"
    planted = {"streamed/model-00001-of-00001.safetensors.partial": _outside(tmp_path, "shard"),
               "streamed/model.safetensors.index.json.partial": _outside(tmp_path, "index"),
               "streamed/config.json": _outside(tmp_path, "config"),
               "masks.safetensors": _outside(tmp_path, "masks"),
               "compressed.safetensors": _outside(tmp_path, "compressed")}
    for name, target in planted.items():
        _plant_link(run / name, target)
    writer = ShardWriter(run / "streamed", shards=1)
    writer.write({"w": torch.ones(3)})
    writer.finish()
    save_masks({"w": torch.ones(4, dtype=torch.bool)}, run / "masks.safetensors")
    save_compressed({"w": torch.zeros(64)}, run / "compressed.safetensors")
    for name, target in planted.items():
        assert target.read_bytes() == OUTSIDE_TEXT, f"{name} was written through its link"
    assert not (run / "streamed" / "config.json").exists()  # the link is gone, its target kept
    assert torch.equal(ShardReader(run / "streamed").read(["w"])["w"], torch.ones(3))
    assert torch.equal(load_masks(run / "masks.safetensors")["w"], torch.ones(4, dtype=torch.bool))
    assert torch.equal(load_compressed(run / "compressed.safetensors")["w"], torch.zeros(64))


def test_cache_entries_are_never_written_through_links(tmp_path, monkeypatch):
    cache = PrepassCache(tmp_path / "cache" / "prepass")
    parts = {"weights": "0" * 64}
    outside = _outside(tmp_path, "ratios.json")
    _plant_link(cache.path(cache.key(parts)), outside)
    assert cache.load(parts, 2) is None
    cache.save(parts, [0.5, 0.25])
    assert outside.read_bytes() == OUTSIDE_TEXT and cache.load(parts, 2) == [0.5, 0.25]

    # a converted model's cache folder that is a link to something that is no converted model
    monkeypatch.setattr(loading, "convert_gguf_to_safetensors", lambda gguf, folder: save_file({"w": torch.ones(2)},
                                                                                               str(folder / SINGLE)))
    gguf = tmp_path / "src" / "a.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(os.urandom(4096))
    cfg = {"name": "m", "source": "gguf_package", "package": "unused", "gguf_file": "unused.gguf", "path": str(gguf),
           "sha256": None}
    target = loading.cache_folder("m", loading.gguf_sha256(gguf), tmp_path / "cache")
    victim = _outside(tmp_path, "not-a-model")
    _plant_link(target, victim)
    with pytest.raises(loading.ModelLoadError, match="symbolic link"):
        loading.prepare_packaged_model(cfg, tmp_path / "cache")
    assert victim.read_bytes() == OUTSIDE_TEXT and target.is_symlink()
