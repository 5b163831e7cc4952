"""``python -m prunelab``: the Hydra application.

A single run exits 2 with one line for a user error (a bad value, missing data, a model that cannot
be found) and 1 with a traceback for anything else. In a multirun every job runs whatever happened to
the others: a failed job leaves ``failed.json`` in its folder, and the sweep ends non-zero naming the
failed jobs (``prunelab.tracking.sweep.SweepSummary``). SIGTERM stops the run (and a sweep) like
Ctrl-C does, is recorded in ``failed.json`` with the phase it interrupted, and exits 143.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from prunelab.config.schema import ConfigError, register
from prunelab.interrupt import RunInterrupted, sigterm_interrupts

log = logging.getLogger("prunelab")

# conf/ sits beside the package in the checkout (installs are editable: `pip install -e .`).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register()


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user asked for something that cannot work": one line, no traceback."""
    from prunelab.data.calibration import CalibrationError
    from prunelab.data.sources import DataUnavailableError
    from prunelab.io.checkpoint import CheckpointError
    from prunelab.models.loading import ModelLoadError

    return (ConfigError, DataUnavailableError, ModelLoadError, CalibrationError, CheckpointError)


def failed_value(cfg: DictConfig) -> float | list[float]:
    """What a failed job returns to the sweeper: NaN for each objective ``optimized_metric`` names."""
    value = cfg.get("optimized_metric")
    several = value is not None and not isinstance(value, str) and len(value) > 1
    return [math.nan] * len(value) if several else math.nan  # the shape a success returns (objective.objective)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | list[float] | None:
    """Run one job; returns the value of ``optimized_metric`` (so sweepers can optimise it)."""
    from prunelab.runner import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        with sigterm_interrupts():
            payload = run(cfg, run_dir)
    except RunInterrupted as stop:  # the whole run (and sweep) ends, as the sender asked
        log.error("%s; failed.json in %s records the phase", stop, run_dir)
        sys.exit(stop.exit_code)
    except user_errors() as error:
        log.error("%s", error)
        if multirun:  # the other jobs of the sweep still run; SweepSummary names this one at the end
            return failed_value(cfg)
        sys.exit(2)
    except Exception:
        if not multirun:
            raise
        log.exception("job %s failed (failed.json in %s); the sweep goes on", hydra_cfg.job.num, run_dir)
        return failed_value(cfg)
    return payload["objective"]["value"]
