"""Staging names for everything the caches write: ``<target>.tmp-<host>-<pid>-<random>``, beside the target.

Every cache entry (a converted model, calibration windows, shared statistics, an OWL pre-pass) is
written under a staging name and renamed into place when complete, so a reader never sees half an
entry. A process killed with SIGKILL (or a full machine's OOM killer) cannot clean up after
itself; its staging file or folder names the host (and PID namespace) and the process that wrote
it, and the next writer into the same folder removes those whose process is gone on this host, or,
from another host, that are older than a day. Only names of this exact form, directly in that folder, are touched.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
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
