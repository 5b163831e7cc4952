"""``python -m prunelab``: the Hydra application.

A single run exits 2 with one line for a user error (a bad value, missing data, a model that cannot
be found, a value or option Hydra cannot compose) and 1 with a traceback for anything else. In a
multirun every job runs whatever happened to the others: a failed job leaves ``failed.json`` in its
folder, and the sweep ends non-zero naming the failed jobs (``prunelab.tracking.sweep.SweepSummary``).
Ctrl-C and SIGTERM stop the run (and a sweep), are recorded in ``failed.json`` with the phase they
interrupted and the signal, print one line and exit 130 / 143.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from prunelab.config.schema import ConfigError, register
from prunelab.interrupt import RunInterrupted, signal_interrupts

log = logging.getLogger("prunelab")

# the Hydra configs: prunelab/conf/, package data of the wheel
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped inside the package (wheel installs too)

register()


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user asked for something that cannot work": one line, no traceback."""
    from prunelab.data.calibration import CalibrationError
    from prunelab.data.sources import DataUnavailableError
    from prunelab.io.checkpoint import CheckpointError
    from prunelab.models.loading import ModelLoadError
    from prunelab.tracking.objective import MetricError

    return (ConfigError, DataUnavailableError, ModelLoadError, CalibrationError, CheckpointError, MetricError)


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
        with signal_interrupts():
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


def _raised_in_a_job(error: BaseException) -> bool:
    """Whether ``error`` came out of a job (a bug there, to be shown with its traceback) rather than composition."""
    job = getattr(main, "__wrapped__", main).__code__
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is job:
            return True
        tb = tb.tb_next
    return False


def composition_error(error: BaseException) -> str:
    """One line for a value or option Hydra cannot compose (``method=foo``, ``sparsity=abc``, a misspelt preset)."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(sorted(error.options))}"
    parts = [str(error)]
    if error.__cause__ is not None:
        parts.append(str(error.__cause__))
    lines = [line.strip() for part in parts for line in part.splitlines()]
    # OmegaConf appends "full_key: ... / object_type=..." lines: the override already names the key
    lines = [line for line in lines if line and not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return "; ".join(dict.fromkeys(lines))


def entry() -> None:
    """``python -m prunelab``: Hydra's app, with its composition errors given like prunelab's own.

    A value or option Hydra cannot compose stops before any job or run folder exists: one line on
    stderr and exit 2, as for a value prunelab refuses. ``HYDRA_FULL_ERROR=1`` keeps Hydra's own
    report (and its traceback).
    """
    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # so Hydra raises instead of printing and exiting 1
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a job (composition, between a sweep's jobs): nothing to record
        sys.stderr.write(f"prunelab: stopped by SIGINT{os.linesep}")
        sys.exit(128 + signal.SIGINT)
    except (HydraException, OmegaConfBaseException) as error:
        if _raised_in_a_job(error):  # a bug, not a composition error: keep the traceback
            raise
        sys.stderr.write(f"prunelab: {composition_error(error)}{os.linesep}")
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
