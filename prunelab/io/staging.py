"""Staging names for everything the caches write: ``<target>.tmp-<host>-<pid>-<random>``, beside the target.

Every cache entry (a converted model, calibration windows, shared statistics, an OWL pre-pass) is
written under a staging name and renamed into place when complete, so a reader never sees half an
entry. A process killed with SIGKILL (or a full machine's OOM killer) cannot clean up after
itself; its staging file or folder names the host (and PID namespace) and the process that wrote
it, and the next writer into the same folder removes those whose process is gone on this host, or,
from another host, that are older than a day. Only names of this exact form, directly in that folder, are touched.

What these writes leave is meant to be shared: files get ``0666 & ~umask`` and folders ``0777 & ~umask``
(as any new file, and as ``results.json``), not the 0600 that safetensors gives its files
(:func:`share_tree`, :func:`replacing`). And a write never goes through a symbolic link planted where
it writes: a staging file is created with ``O_EXCL | O_NOFOLLOW`` (:func:`write_new`), and a link at the
target is replaced by the rename, its target never opened.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600  # a staging entry this old is abandoned, whoever owns it
_STAGING = re.compile(r"^(?P<target>.+)\.tmp-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


def host() -> str:
    """Who can judge this process's pids: the machine's name, plus its PID namespace where there is one.

    Two containers with the same host name but their own PID namespaces (Apptainer ``--pid``, Docker
    with a fixed ``--hostname``) sharing a cache then count as two hosts, and neither takes the other's
    live process for a dead one. Characters outside ``[A-Za-z0-9_.-]`` are replaced.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    try:
        return f"{name}_ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS): the host name alone
        return name


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def _started_after(pid: int, moment: float) -> bool:
    """True when process ``pid`` started after ``moment``: a reused pid, not the staging entry's writer.

    The start time is ``/proc/<pid>/stat``'s field 22 (clock ticks after boot) plus the boot time.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):  # no /proc, or it exited: no evidence either way
        return False
    return started > moment + 2.0  # btime has whole seconds


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (no window with umask 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0)
    os.umask(current)
    return current


def new_file_mode() -> int:
    """The permissions any new file gets: ``0666`` less the umask."""
    return 0o666 & ~current_umask()


def new_folder_mode() -> int:
    """The permissions any new folder gets: ``0777`` less the umask."""
    return 0o777 & ~current_umask()


def share_tree(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions of new files and folders.

    For what prunelab has just written (safetensors creates its files 0600). Symbolic links are
    left alone, and nothing is reached through them.
    """
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, new_file_mode())
        return
    os.chmod(path, new_folder_mode())
    for root, folders, files in os.walk(path):  # os.walk does not descend into linked folders
        for name in folders:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), new_folder_mode())
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), new_file_mode())


def write_new(path: Path, data: str | bytes) -> None:
    """Write ``data`` into a new file at ``path`` (mode ``0666`` less the umask), never through a link.

    Whatever is at ``path`` first (a stale partial file, or a planted symbolic link) is removed,
    not opened: the link's target is left as it was. The file is flushed to disk before returning.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def replacing(target: Path, partial: Path | None = None) -> Iterator[Path]:
    """Yield a fresh path to write ``target``'s new content into; on success it replaces ``target``.

    ``partial`` (default: a staging name beside ``target``) is cleared first, so a link planted there
    is removed, not written through; the finished file gets the permissions of a new file and is
    renamed over ``target`` (a link at ``target`` is replaced, its target never touched). On an
    error the partial file is removed and ``target`` stays as it was.
    """
    partial = partial if partial is not None else staging_path(target)
    partial.unlink(missing_ok=True)
    try:
        yield partial
        if partial.is_symlink() or not partial.is_file():
            raise OSError(f"{partial} is not the file just written (a symbolic link, or missing)")
        os.chmod(partial, new_file_mode())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def staging_path(target: Path) -> Path:
    """A staging name for ``target``, unique to this process, in the same folder (so the rename is atomic)."""
    return target.with_name(f"{target.name}.tmp-{host()}-{os.getpid()}-{secrets.token_hex(4)}")


def staging_owner(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a staging name, or None when the name is not a staging name."""
    match = _STAGING.match(name)
    return (match["host"], int(match["pid"])) if match else None


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging files and folders in ``folder`` whose writer is gone.

    On this host (and PID namespace): its process has exited, or the pid now belongs to a process
    started after the entry was last written. From another host: the entry is older than a day.
    Returns the paths really removed. Symbolic links, names of any other form and entries that
    cannot be removed (another user's) are left alone: cleaning never fails the write it precedes.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    this_host = host()
    for entry in folder.iterdir():
        owner = staging_owner(entry.name)
        if owner is None or entry.is_symlink():
            continue
        owner_host, pid = owner
        try:
            modified = entry.stat().st_mtime
        except FileNotFoundError:  # its owner finished (renamed or removed it) meanwhile
            continue
        if owner_host == this_host:
            stale = not pid_alive(pid) or _started_after(pid, modified)
        else:
            stale = time.time() - modified > STALE_AFTER_S
        if not stale:
            continue
        try:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError as err:
            log.debug("cannot remove the stale staging entry %s (%s)", entry, err)
            continue
        log.warning("removed %s, left by an interrupted write (pid %d on %s)", entry, pid, owner_host)
        removed.append(entry)
    return removed
