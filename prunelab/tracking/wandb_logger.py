"""Weights & Biases logging: offline by default (no account needed), one W&B run per job."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from prunelab.config.schema import LoggerConfig
from prunelab.config.typed import typed

log = logging.getLogger(__name__)


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}``, keeping scalars and strings only."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


class WandbLogger:
    """Thin wrapper: ``start`` → ``log_summary`` → ``finish`` (always call finish, e.g. in finally)."""

    def __init__(self, logger_cfg: LoggerConfig | Mapping[str, Any]):
        self.cfg = typed(LoggerConfig, logger_cfg, "logger")
        self.run = None
        self.step = 0  # W&B's step: one per logged row, increasing over every training of the run

    @property
    def mode(self) -> str:
        """``logger.mode``, unless the environment sets ``WANDB_MODE`` (W&B's own switch, which wins as it
        does for every W&B program: ``WANDB_MODE=offline`` runs a sweep spec's online command offline)."""
        return os.environ.get("WANDB_MODE") or self.cfg.mode

    @property
    def enabled(self) -> bool:
        return self.cfg.name == "wandb" and self.mode != "disabled"

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def start(self, run_dir: Path, config: dict[str, Any], name: str, tags: list[str],
              resume: dict[str, Any] | None = None) -> None:
        """Start the run; ``resume`` (``{"id", "step"}`` from a checkpoint) continues that W&B run's
        history after its last step instead of starting another."""
        if not self.enabled:
            return
        import wandb

        extra: dict[str, Any] = {}
        if resume and resume.get("id"):
            extra = {"id": resume["id"], "resume": "allow"}
            self.step = int(resume.get("step") or 0)

        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))  # a `wandb agent` job: the sweep's project and entity
        self.run = wandb.init(
            project=None if in_sweep else self.cfg.project,
            entity=None if in_sweep else self.cfg.entity,
            group=self.cfg.group,
            mode=self.mode,
            dir=str(run_dir),
            name=name,
            tags=list(tags),
            config=config,
            reinit="finish_previous",
            **extra,
        )
        log.info("W&B run %s (%s) in %s", self.run.id, self.mode, run_dir / "wandb")

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        for key, value in flatten(metrics).items():
            self.run.summary[key] = value

    def log_step(self, record: Mapping[str, Any]) -> None:
        """Stream one training step (loss, learning rate, tokens, the training's own ``step``, ...) as it
        happens, under ``train/``."""
        self._log("train", record)

    def log_point(self, point: Mapping[str, Any]) -> None:
        """Stream one schedule point (step or round: target and achieved sparsity, perplexity) under ``schedule/``."""
        self._log("schedule", point)

    def _log(self, prefix: str, record: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        self.step += 1
        self.run.log({f"{prefix}/{k}": v for k, v in flatten(record).items()}, step=self.step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
