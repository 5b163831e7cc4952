"""A Hydra sweeper whose jobs are a union of grids: how a paper's table is shaped.

Hydra's basic sweeper runs one cartesian product. A paper table is several: the dense model once, every
method at every pattern, a few cells again with other calibration seeds. ``hydra/sweeper=grids`` takes
``hydra.sweeper.grids`` (a list of ``key: comma-separated values`` mappings, each expanded like the
basic sweeper expands its ``params``), adds the shared ``params`` and the command line to each (the
command line last, so ``method=wanda`` narrows every grid to Wanda), expands each with Hydra's own
override parser, and launches the union in order with duplicates dropped. Job numbers follow that order.
The sweeper class lives in ``hydra_plugins/prunelab_sweeper`` (Hydra instantiates sweepers from that
namespace only); what it plans is decided here.

The experiment presets (``prunelab/conf/experiment/*-table.yaml``) use it; ``prunelab.report.grid`` expands a
sweep's ``multirun.yaml`` with the same :func:`expand` to find jobs that were never launched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser

log = logging.getLogger(__name__)

TARGET = "hydra_plugins.prunelab_sweeper.grids.GridsSweeper"
PLANNED_FILE = "planned_jobs.yaml"  # the sweep's jobs after duplicates of the same config were dropped  # Hydra loads sweepers from hydra_plugins only


@dataclass
class GridsSweeperConf:
    _target_: str = TARGET
    max_batch_size: Optional[int] = None  # jobs handed to the launcher at once (null: all)
    params: Optional[dict[str, str]] = None  # shared by every grid
    grids: Optional[list[dict[str, str]]] = None  # the union's parts; null or empty: one grid (params x command line)


def register() -> None:
    """Make ``hydra/sweeper=grids`` selectable (called with the schema's registration)."""
    ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="prunelab")


def expand(arguments: list[str], params: dict[str, Any] | None = None, grids: list[dict[str, Any]] | None = None,
           config_loader: Any = None) -> list[list[str]]:
    """Every job's overrides, in launch order: for each grid, params + grid + ``arguments`` (later keys win),
    expanded as a cartesian product; jobs already planned by an earlier grid are dropped."""
    parser = OverridesParser.create(config_loader=config_loader)
    shared = [f"{key}={value}" for key, value in (params or {}).items()]
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for grid in grids or [{}]:
        grid_args = [f"{key}={value}" for key, value in (grid or {}).items()]
        parsed = parser.parse_overrides(shared + grid_args + [str(a) for a in arguments])
        for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None):
            for job in batch:
                key = tuple(sorted(job))
                if key not in seen:
                    seen.add(key)
                    jobs.append(list(job))
    return jobs
