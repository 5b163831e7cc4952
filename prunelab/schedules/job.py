"""The runner's side of a schedule: the real model, pruned and trained by ``prunelab.steps``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from prunelab import steps
from prunelab.io.masks import apply_masks
from prunelab.prune.pattern import Pattern
from prunelab.tracking.wandb_logger import WandbLogger

Masks = dict[str, torch.Tensor]


class RunJob:
    """Implements ``prunelab.schedules.drivers.Job`` on a loaded model.

    ``model`` may be replaced by a training step (LoRA merges); read it from here after a schedule.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: DictConfig, method: Any, pattern: Pattern,
                 payload: dict[str, Any], timer: Any, logger: WandbLogger, run_dir: Path):
        self.model, self.tokenizer, self.cfg, self.logger, self.timer = model, tokenizer, cfg, logger, timer
        self.pruner = steps.PruneStep(tokenizer, cfg, method, pattern, payload, timer, run_dir)
        self.trainer = steps.FinetuneStep(tokenizer, cfg, logger.log_step, timer)
        self.reports: list[dict[str, Any]] = []
        self._evaluate = None  # built on first use: one-shot runs never score a trajectory point

    def prune(self, sparsity: float, frozen: Masks | None) -> dict[str, Any]:
        self.reports.append(self.pruner(self.model, sparsity, frozen))
        return self.reports[-1]

    def masks(self) -> Masks:
        return steps.target_masks(self.model, self.cfg)

    def finetune(self, masks: Masks, snapshot_step: int | None = None) -> dict[str, Any]:
        self.model, record = self.trainer(self.model, masks, snapshot_step)
        return record

    def weights(self) -> Masks:
        return {name: param.detach().to("cpu", copy=True) for name, param in self.model.named_parameters()}

    @torch.no_grad()
    def rewind(self, weights: Masks, masks: Masks) -> None:
        params = dict(self.model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
        if masks:
            apply_masks(self.model, masks)

    def random_masks(self, like: Masks, seed: int) -> Masks:
        """For each matrix, a uniformly random keep-mask with exactly as many kept entries as ``like``'s."""
        generator = torch.Generator().manual_seed(seed)
        out = {}
        for name, keep in like.items():
            order = torch.randperm(keep.numel(), generator=generator)
            mask = torch.zeros(keep.numel(), dtype=torch.bool)
            mask[order[: int(keep.sum())]] = True
            out[name] = mask.view_as(keep)
        return out

    def checkpoint_eval(self) -> dict[str, Any]:
        with self.timer("schedule_eval"):
            if self._evaluate is None:
                self._evaluate = steps.training_perplexity(self.model, self.tokenizer, self.cfg,
                                                           int(self.cfg.schedule.eval_windows))
            return self._evaluate(self.model)

    def record(self, point: dict[str, Any]) -> None:
        self.logger.log_point({k: v for k, v in point.items() if not isinstance(v, dict)})

    def sparsity(self) -> float:
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0
