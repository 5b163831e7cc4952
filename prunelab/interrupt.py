"""Ctrl-C and SIGTERM as one kind of interruption: a run must record that it stopped, and how.

Python turns SIGINT into a bare ``KeyboardInterrupt`` (a traceback, exit 1, no signal named) and
lets SIGTERM end the process at once, so no ``finally`` runs and the run folder is left without
``failed.json``. Inside ``signal_interrupts()`` both raise ``RunInterrupted`` (a
``KeyboardInterrupt`` that names its signal) instead, so the same clean-up and record happen, the
CLI says so in one line and exits as a process stopped by that signal would (130, 143).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``signal_name`` says which, ``exit_code`` is the shell's 128 + N."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


def _raise_interrupted(signum: int, _frame: object) -> None:
    # a second signal (schedulers repeat SIGTERM, people press Ctrl-C twice) must not cut short the
    # writing of failed.json; SIGKILL (or Ctrl-\) still ends the process at once
    for each in SIGNALS:
        signal.signal(each, signal.SIG_IGN)
    raise RunInterrupted(signum)


@contextmanager
def signal_interrupts() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise ``RunInterrupted``; the previous handlers are restored after.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {each: signal.signal(each, _raise_interrupted) for each in SIGNALS}
    try:
        yield
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler)
