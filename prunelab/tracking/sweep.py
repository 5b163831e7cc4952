"""The end of a Hydra multirun: which jobs completed and which did not, and a non-zero exit if any failed.

Registered as a Hydra callback in ``prunelab/conf/config.yaml``. It reads the job folders under the sweep
folder with the report's own reader (``prunelab.report.collect_runs``), so it works for every
launcher, also when jobs ran in other processes or on other machines: each job that did not complete
is logged with its overrides and the phase and error from its ``failed.json``. Only the jobs of the
ending invocation's grid (from its own config) decide the exit code, and of a job run again under
another job number only its newest folder: a narrowed re-run into an older sweep folder is not
failed by a job it did not run, nor by a failure it has since retried.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def this_invocation(hydra: Mapping[str, Any]) -> set[tuple[str, ...]] | None:
    """The (sorted) override lists of the jobs planned by the invocation whose ``hydra`` config node this is.

    Read from the ending invocation's own config, not from the sweep folder's ``multirun.yaml``:
    another invocation into the same folder may have rewritten that file meanwhile, and Optuna's
    sweeper writes none. None when the grid is unknown (a search sweeper such as Optuna): then every
    job folder counts.
    """
    from prunelab.report.grid import grid_of

    try:
        return {tuple(sorted(job)) for job in grid_of(hydra)}  # grids sweeper: a superset (duplicates kept)
    except ValueError as err:
        log.info("this invocation's grid is unknown (%s); every job folder in the sweep folder is judged", err)
        return None


def _started(sweep_dir: Path, name: str) -> float:
    """When the job in folder ``name`` last started (Hydra rewrites its ``.hydra/overrides.yaml`` then)."""
    from prunelab.report.grid import OVERRIDES_FILE

    try:
        return (sweep_dir / name / OVERRIDES_FILE).stat().st_mtime
    except OSError:
        return float("-inf")


def summarize(sweep_dir: Path, hydra: Mapping[str, Any] | None = None) -> list[str]:
    """Log the sweep's outcome; return one line per job that did not complete (empty when all did).

    Args:
        sweep_dir: the sweep folder.
        hydra: the ending invocation's ``hydra`` config node. Given, only the folders of its own grid
            count: a folder outside it (an older, wider run into the same sweep folder) is named in a
            warning, and of several folders with the same overrides (a job run again under another
            job number) only the newest counts.
    """
    from prunelab.report import collect_runs

    runs, incomplete = collect_runs(sweep_dir, log_incomplete=False)  # listed once, by SweepSummary
    planned = this_invocation(hydra) if hydra is not None else None
    if planned is not None:
        def mine(overrides: list[str]) -> bool:
            return not overrides or tuple(sorted(overrides)) in planned

        for item in incomplete:
            if not mine(item.overrides):
                log.warning("not this invocation's job, not counted: %s", item.describe())
        runs = [run for run in runs if mine(run.overrides)]
        incomplete = [item for item in incomplete if mine(item.overrides)]
        newest: dict[tuple[str, ...], tuple[float, str]] = {}
        for item in [*runs, *incomplete]:
            if item.overrides:
                key, started = tuple(sorted(item.overrides)), _started(sweep_dir, item.name)
                newest[key] = max(newest.get(key, (started, item.name)), (started, item.name))

        def latest(item: Any) -> bool:
            return not item.overrides or newest[tuple(sorted(item.overrides))][1] == item.name

        for item in incomplete:
            if not latest(item):
                log.info("superseded by a newer folder with the same overrides, not counted: %s", item.describe())
        runs = [run for run in runs if latest(run)]
        incomplete = [item for item in incomplete if latest(item)]
    total = len(runs) + len(incomplete)
    skipped = [run.name for run in runs if run.skipped]
    log.info("sweep %s: %d jobs, %d complete, %d not; %d skipped (complete before: redo=true runs them again)",
             sweep_dir, total, len(runs), len(incomplete), len(skipped))
    return [item.describe() for item in incomplete]


class SweepSummary(Callback):
    """At the end of a multirun: name the jobs that did not complete and exit 1 if there are any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        hydra = OmegaConf.to_container(config.hydra, resolve=False)
        failed = summarize(Path(str(config.hydra.sweep.dir)), hydra)
        if failed:
            log.error("%d job(s) did not complete:\n  %s", len(failed), "\n  ".join(failed))
            sys.exit(1)  # SystemExit passes Hydra's callback guard, which only catches Exception
