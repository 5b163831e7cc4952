"""SIGTERM as an interruption: schedulers and timeouts send it, and a run must record that it stopped.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM end the process at once, so no
``finally`` runs and the run folder is left without ``failed.json``. Inside ``sigterm_interrupts()``
SIGTERM raises ``RunInterrupted`` (a ``KeyboardInterrupt``) instead, so the same clean-up and record
happen as for Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``signal_name`` says which, ``exit_code`` is the shell's 128 + N."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


def _raise_interrupted(signum: int, _frame: object) -> None:
    # a second SIGTERM (schedulers repeat it) must not cut short the writing of failed.json
    signal.signal(signum, signal.SIG_IGN)
    raise RunInterrupted(signum)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises ``RunInterrupted``; the previous handler is restored after.

    Signal handlers can only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
