"""Progress a person can see on every loop they wait for, in a terminal and in a log file alike.

On a terminal this is a tqdm bar (k / N, elapsed, time left, rate). Where stderr is not a terminal
(a pipe, ``nohup``, a SLURM log, W&B's captured output), or is a pseudo-terminal that reports no
width (``script``, some ``docker exec -t``: tqdm then draws nothing at all), the same
numbers go through ``logging`` instead: one line at most every ``PRUNELAB_PROGRESS_INTERVAL``
seconds (default 30) and one at the end.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger("prunelab.progress")


class _LogLines:
    """A file-like object for tqdm that sends each non-empty redraw to the log."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            log.info("%s", text)

    def flush(self) -> None:
        pass


def _terminal() -> bool:
    """stderr is a terminal with a known width (a pseudo-terminal without one makes tqdm draw nothing)."""
    stream = sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


def progress(iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
             leave: bool = True, enabled: bool = True) -> tqdm:
    """Iterate over ``iterable`` showing ``desc``: k / N with time left (a bar, or log lines).

    Returns the tqdm object, so a loop can show more with ``set_postfix`` (loss, tokens/s).
    """
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if _terminal():
        return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, dynamic_ncols=True)
    interval = float(os.environ.get("PRUNELAB_PROGRESS_INTERVAL", "30"))
    return tqdm(iterable, desc=desc, unit=unit, total=total, file=_LogLines(), mininterval=interval,
                maxinterval=interval * 4, ascii=True, ncols=120)
