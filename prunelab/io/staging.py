"""Staging names for everything the caches write: ``<target>.tmp-<host>-<pid>-<random>``, beside the target.

Every cache entry (a converted model, calibration windows, shared statistics, an OWL pre-pass) is
written under a staging name and renamed into place when complete, so a reader never sees half an
entry. A process killed with SIGKILL (or a full machine's OOM killer) cannot clean up after
itself; its staging file or folder names the host and the process that wrote it, and the next
writer into the same folder removes those whose process is gone on this host, or that are older
than a day whoever wrote them. Only names of this exact form, directly in that folder, are touched.
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
    """This machine's name as it appears in staging names (characters outside ``[A-Za-z0-9_.-]`` replaced)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def staging_path(target: Path) -> Path:
    """A staging name for ``target``, unique to this process, in the same folder (so the rename is atomic)."""
    return target.with_name(f"{target.name}.tmp-{host()}-{os.getpid()}-{secrets.token_hex(4)}")


def staging_owner(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a staging name, or None when the name is not a staging name."""
    match = _STAGING.match(name)
    return (match["host"], int(match["pid"])) if match else None


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging files and folders in ``folder`` whose owner process is gone (or older than a day).

    Returns the removed paths. Symbolic links and names of any other form are left alone.
    """
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        owner = staging_owner(entry.name)
        if owner is None or entry.is_symlink():
            continue
        owner_host, pid = owner
        try:
            age = time.time() - entry.stat().st_mtime
        except FileNotFoundError:  # its owner finished (renamed or removed it) meanwhile
            continue
        if (owner_host == host() and not pid_alive(pid)) or age > STALE_AFTER_S:
            log.warning("removing %s, left by an interrupted write (pid %d on %s)", entry, pid, owner_host)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
