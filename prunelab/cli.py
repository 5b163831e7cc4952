"""``python -m prunelab``: the Hydra application."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from prunelab.config.schema import ConfigError, register

log = logging.getLogger("prunelab")

# conf/ sits beside the package in the checkout (installs are editable: `pip install -e .`).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register()


def _user_errors() -> tuple[type[BaseException], ...]:
    from prunelab.data.calibration import CalibrationError
    from prunelab.data.sources import DataUnavailableError
    from prunelab.models.loading import ModelLoadError

    return (ConfigError, DataUnavailableError, ModelLoadError, CalibrationError)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the first perplexity (so sweepers can optimise it)."""
    from prunelab.runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        payload = run(cfg, run_dir)
    except _user_errors() as error:
        log.error("%s", error)
        sys.exit(2)
    perplexities = payload.get("metrics", {}).get("perplexity", {})
    return next(iter(perplexities.values()))["ppl"] if perplexities else None
