"""The end of a Hydra multirun: which jobs completed and which did not, and a non-zero exit if any failed.

Registered as a Hydra callback in ``conf/config.yaml``. It reads the job folders under the sweep
folder with the report's own reader (``prunelab.report.collect_runs``), so it works for every
launcher, also when jobs ran in other processes or on other machines: each job that did not complete
is logged with its overrides and the phase and error from its ``failed.json``. Only the jobs of the
latest invocation's grid (its ``multirun.yaml``) decide the exit code, so a narrowed re-run into an
older sweep folder is not failed by a job it did not run.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def this_invocation(sweep_dir: Path) -> set[tuple[str, ...]] | None:
    """The (sorted) override lists of the jobs the latest invocation planned in ``sweep_dir``.

    Hydra rewrites ``multirun.yaml`` at the start of every invocation, so a narrowed re-run into an
    older sweep folder plans only its own grid. None when the grid is unknown (another sweeper, such
    as Optuna, or an unreadable file): then every job folder counts.
    """
    from prunelab.report.grid import MULTIRUN_FILE, planned_jobs

    try:
        return {tuple(sorted(job)) for job in planned_jobs(sweep_dir / MULTIRUN_FILE)}
    except (ValueError, OSError) as err:
        log.info("%s: this invocation's grid is unknown (%s); every job folder in it is judged", sweep_dir, err)
        return None


def summarize(sweep_dir: Path) -> list[str]:
    """Log the sweep's outcome; return one line per job of this invocation that did not complete (empty when all did).

    A job folder outside this invocation's grid (an older, wider run into the same sweep folder) is
    named in a warning but not counted: a narrowed re-run answers for its own jobs.
    """
    from prunelab.report import collect_runs

    runs, incomplete = collect_runs(sweep_dir, log_incomplete=False)  # listed once, by SweepSummary
    planned = this_invocation(sweep_dir)
    if planned is not None:
        mine = [run for run in runs if not run.overrides or tuple(sorted(run.overrides)) in planned]
        others = [item for item in incomplete if item.overrides and tuple(sorted(item.overrides)) not in planned]
        incomplete = [item for item in incomplete if item not in others]
        for item in others:
            log.warning("not this invocation's job, not counted: %s", item.describe())
        runs = mine
    total = len(runs) + len(incomplete)
    skipped = [run.name for run in runs if run.skipped]
    log.info("sweep %s: %d jobs, %d complete, %d not; %d skipped (complete before: redo=true runs them again)",
             sweep_dir, total, len(runs), len(incomplete), len(skipped))
    return [item.describe() for item in incomplete]


class SweepSummary(Callback):
    """At the end of a multirun: name the jobs that did not complete and exit 1 if there are any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = summarize(Path(str(config.hydra.sweep.dir)))
        if failed:
            log.error("%d job(s) did not complete:\n  %s", len(failed), "\n  ".join(failed))
            sys.exit(1)  # SystemExit passes Hydra's callback guard, which only catches Exception
