"""Every cache write goes through a staging name that names its process; what a killed writer left is
removed by the next writer into the same folder, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from prunelab.data.calibration import load_cached_windows, save_cached_windows
from prunelab.io.staging import host, remove_stale_staging, staging_owner, staging_path
from prunelab.prune.prepass_cache import PrepassCache
from prunelab.prune.stats_cache import StatsCache


def _leftovers(folder: Path, dead: int) -> dict[str, Path]:
    """A killed writer's file and folder, a live process's, an old foreign one, a new foreign one, unrelated names."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "dead_file": folder / f"x.pt.tmp-{host()}-{dead}-0123abcd",
        "dead_dir": folder / f"y.tmp-{host()}-{dead}-0123abce",
        "live": folder / f"z.tmp-{host()}-{os.getpid()}-89abcdef",
        "foreign_old": folder / "w.tmp-elsewhere-1-aaaaaaaa",
        "foreign_new": folder / "v.tmp-elsewhere-1-bbbbbbbb",
        "unrelated": folder / "notes.tmp-abc",
        "unrelated_dir": folder / f"keep.tmp-{host()}-{dead}",  # no token: not a staging name
    }
    for name, path in paths.items():
        if name.endswith("dir"):
            path.mkdir()
            (path / "part").write_bytes(b"half")
        else:
            path.write_bytes(b"half")
    two_days_ago = time.time() - 2 * 86400
    os.utime(paths["foreign_old"], (two_days_ago, two_days_ago))
    return paths


def _only_stale_ones_gone(paths: dict[str, Path]) -> None:
    gone = {name for name, path in paths.items() if not path.exists()}
    assert gone == {"dead_file", "dead_dir", "foreign_old"}


def test_staging_names_carry_this_process_and_stay_beside_the_target(tmp_path):
    path = staging_path(tmp_path / "entry")
    assert path.parent == tmp_path and path.name.startswith("entry.tmp-")
    assert staging_owner(path.name) == (host(), os.getpid())
    assert staging_owner("entry.tmp-abc") is None and staging_path(tmp_path / "entry") != path


def test_the_calibration_cache_cleans_up_after_a_killed_writer(tmp_path, dead_pid):
    paths = _leftovers(tmp_path / "calibration", dead_pid)
    windows = torch.arange(12).reshape(3, 4)
    target = tmp_path / "calibration" / "c4.pt"
    save_cached_windows(target, "k", windows)
    _only_stale_ones_gone(paths)
    assert torch.equal(load_cached_windows(target, "k", 3, 4), windows)


def test_the_prepass_cache_cleans_up_after_a_killed_writer(tmp_path, dead_pid):
    cache = PrepassCache(tmp_path / "prepass")
    paths = _leftovers(cache.folder, dead_pid)
    parts = {"model": "m", "ratios": 3}
    written = cache.save(parts, [0.5, None, 0.25])
    _only_stale_ones_gone(paths)
    assert written.is_file() and cache.load(parts, 3) == [0.5, None, 0.25]


def test_the_stats_cache_cleans_up_after_a_killed_writer(tmp_path, dead_pid):
    cache = StatsCache(tmp_path / "stats")
    paths = _leftovers(cache.folder, dead_pid)
    entry = cache.open({"model": "m"}, layers=0)
    _only_stale_ones_gone(paths)
    own = entry._tmp
    assert staging_owner(own.name) == (host(), os.getpid()) and own.parent == cache.folder
    entry.commit()
    assert cache.open({"model": "m"}, layers=0).hit and not own.exists()


def test_a_symlink_with_a_staging_name_is_never_followed(tmp_path, dead_pid):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    folder = tmp_path / "calibration"
    folder.mkdir()
    link = folder / f"a.tmp-{host()}-{dead_pid}-0123abcd"
    link.symlink_to(outside / "precious")
    save_cached_windows(folder / "c4.pt", "k", torch.zeros(1, 2, dtype=torch.int64))
    assert link.is_symlink() and (outside / "precious").read_bytes() == b"keep"


def test_a_reused_pid_does_not_keep_an_old_entry_alive(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        old = tmp_path / f"a.tmp-{host()}-{process.pid}-0123abcd"  # written before that process started
        young = tmp_path / f"b.tmp-{host()}-{process.pid}-0123abce"  # written by it, as far as anyone can tell
        for path in (old, young):
            path.write_bytes(b"half")
        an_hour_ago = time.time() - 3600
        os.utime(old, (an_hour_ago, an_hour_ago))
        assert remove_stale_staging(tmp_path) == [old]
        assert young.exists()
    finally:
        process.kill()
        process.wait()


def test_a_name_with_an_impossible_pid_is_stale_not_a_crash(tmp_path):
    entry = tmp_path / f"a.tmp-{host()}-{10**30}-0123abcd"
    entry.write_bytes(b"half")
    assert remove_stale_staging(tmp_path) == [entry]
