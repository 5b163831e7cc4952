"""``hydra/sweeper=grids``: Hydra's basic launching (batches, ``multirun.yaml``, job numbers) over the
union of grids that :func:`prunelab.sweeper.expand` plans."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf

from prunelab.sweeper import PLANNED_FILE, expand

log = logging.getLogger(__name__)


class GridsSweeper(BasicSweeper):
    """Launches every job of ``grids`` (each with ``params`` and the command line), in order, each once."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict[str, str]] = None,
                 grids: Optional[list[dict[str, str]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in grids or []]

    def _distinct(self, jobs: list[list[str]]) -> list[list[str]]:
        """Drop jobs whose composed config equals an earlier job's (``method=wanda`` given to the dense grid and
        ``method=wanda pattern=unstructured`` are one run)."""
        from prunelab.tracking.results import config_fingerprint

        assert self.config is not None and self.hydra_context is not None
        kept, seen = [], set()
        for job in jobs:
            composed = self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
            task = {k: v for k, v in OmegaConf.to_container(composed, resolve=False).items() if k != "hydra"}
            key = config_fingerprint(task, ignore=())
            if key in seen:
                log.info("grids sweeper: %s is the same run as an earlier job; dropped", " ".join(job))
                continue
            seen.add(key)
            kept.append(job)
        return kept

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        jobs = self._distinct(expand(list(arguments), dict(self.params or {}), self.grids,
                                     self.hydra_context.config_loader))
        size = self.max_batch_size or len(jobs) or 1
        self.overrides = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        log.info("grids sweeper: %d jobs from %d grid(s)", len(jobs), max(1, len(self.grids)))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        OmegaConf.save(OmegaConf.create(jobs), sweep_dir / PLANNED_FILE)  # what the report checks against
        returns = []
        start = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=start)
            for result in results:
                _ = result.return_value  # raises the job's exception when the launcher kept one
            start += len(batch)
            returns.append(results)
        return returns
