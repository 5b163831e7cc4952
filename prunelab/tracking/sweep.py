"""The end of a Hydra multirun: which jobs completed and which did not, and a non-zero exit if any failed.

Registered as a Hydra callback in ``conf/config.yaml``. It reads the job folders under the sweep
folder with the report's own reader (``prunelab.report.collect_runs``), so it works for every
launcher, also when jobs ran in other processes or on other machines: each job that did not complete
is logged with its overrides and the phase and error from its ``failed.json``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def summarize(sweep_dir: Path) -> list[str]:
    """Log the sweep's outcome; return one line per job that did not complete (empty when all did)."""
    from prunelab.report import collect_runs

    runs, incomplete = collect_runs(sweep_dir, log_incomplete=False)  # listed once, by SweepSummary
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
