"""Seconds per named phase of a pruning run, with CUDA work finished before each clock read."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def sync(device: torch.device) -> None:
    """Wait for the queued CUDA work on ``device`` (no-op elsewhere), so a clock read is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall-clock seconds per phase; ``with timer("stats"): ...`` adds to ``seconds["stats"]``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[key] += time.perf_counter() - start
