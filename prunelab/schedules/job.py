"""The runner's side of a schedule: the real model, pruned and trained by ``prunelab.steps``, and
checkpointed into the run folder so an interrupted run resumes (``prunelab.io.checkpoint``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from prunelab import steps
from prunelab.config.schema import PrunelabConfig
from prunelab.device import arithmetic_identity
from prunelab.io.checkpoint import (Checkpoint, CheckpointError, CheckpointStore, load_weights, optimizer_from_tensors,
                                    optimizer_to_tensors, parameters, rng_state, set_rng_state)
from prunelab.io.masks import apply_masks
from prunelab.prune.pattern import Pattern
from prunelab.tracking.wandb_logger import WandbLogger
from prunelab.train.loop import TrainingProgress, copy_weights

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]


class RunJob:
    """Implements ``prunelab.schedules.drivers.Job`` on a loaded model.

    ``model`` may be replaced by a training step (LoRA merges); read it from here after a schedule.
    With a ``store`` every ``save`` of a driver writes a checkpoint, and with ``checkpoint_every`` so
    does every k-th optimizer step of a training (then with the optimizer state). With ``resume`` the
    job loads the store's checkpoint (verified) and continues from it; only the job holds the loaded
    tensors, and it lets go of them as soon as they are in the model.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: PrunelabConfig, method: Any, pattern: Pattern,
                 payload: dict[str, Any], timer: Any, logger: WandbLogger, run_dir: Path,
                 store: CheckpointStore | None = None, resume: bool = False, checkpoint_every: int = 0,
                 evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None):
        self.model, self.tokenizer, self.cfg, self.logger, self.timer = model, tokenizer, cfg, logger, timer
        self.payload = payload
        self.pruner = steps.PruneStep(tokenizer, cfg, method, pattern, payload, timer, run_dir)
        self.trainer = steps.FinetuneStep(tokenizer, cfg, logger.log_step, timer)
        self.reports: list[dict[str, Any]] = []
        self._evaluate = None  # built on first use: one-shot runs never score a trajectory point
        self._full_evaluation = evaluate
        self.method = method
        self.store, self.every = store, int(checkpoint_every or 0) if store is not None else 0
        self._kept: dict[str, Masks] = {}  # groups saved with every checkpoint
        self._on_disk: set[str] = set()  # groups whose current tensors the checkpoint folder already holds
        # the last finished step (a checkpoint inside a training repeats it): the driver's state as JSON,
        # how many prunings had been reported, and the method's state then (random draws)
        self._driver_state: str | None = None
        self._boundary = {"reports": 0, "method": method.state_dict() if method is not None else {}}
        self.restored: Checkpoint | None = None
        if resume and store is not None:
            with timer("resume"):
                self.restored = store.load()
        if self.restored is not None:
            restored = self.restored
            job = restored.state["job"]
            self._boundary = dict(job["boundary"])
            inside_training = restored.state["training"] is not None
            # inside a training the driver replays what came after the last finished step (a control's
            # pruning): start from that step's reports and method state so the replay adds the same
            self.reports = list(job["reports"][: self._boundary["reports"]] if inside_training else job["reports"])
            if method is not None:
                method.load_state_dict(self._boundary["method"] if inside_training else job["method"])
            if job.get("calibration") is not None:
                payload["calibration"] = job["calibration"]
            for group in job["kept"]:
                self._kept[group] = restored.tensors[group]
                self._on_disk.add(group)
            if "masks" in restored.tensors:
                self._on_disk.add("masks")
            self._driver_state = json.dumps(restored.state["driver"])

    # ------------------------------------------------------------------------------ the steps
    def prune(self, sparsity: float, frozen: Masks | None) -> dict[str, Any]:
        self.reports.append(self.pruner(self.model, sparsity, frozen))
        return self.reports[-1]

    def masks(self) -> Masks:
        return steps.target_masks(self.model, self.cfg)

    def finetune(self, masks: Masks, snapshot_step: int | None = None, stage: str = "finetune") -> dict[str, Any]:
        resume, weights = self._training_to_resume(stage)
        checkpoint = None
        if self.every:
            def checkpoint(progress: TrainingProgress, trained: torch.nn.Module) -> None:
                self._save_training(stage, trained, progress)
        self.model, record = self.trainer(self.model, masks, snapshot_step, resume=resume, resume_weights=weights,
                                          checkpoint=checkpoint, checkpoint_every=self.every)
        return record

    def weights(self) -> Masks:
        return copy_weights(self.model)

    @torch.no_grad()
    def rewind(self, weights: Masks, masks: Masks) -> None:
        load_weights(self.model, weights)
        if masks:
            apply_masks(self.model, masks)

    def random_masks(self, like: Masks, seed: int) -> Masks:
        """For each matrix, a uniformly random keep-mask with exactly as many kept entries as ``like``'s.

        The matrices draw in the model's parameter order, whatever the order of ``like`` (a checkpoint
        gives masks back sorted by name), so a resumed run draws the same masks.
        """
        generator = torch.Generator().manual_seed(seed)
        out = {}
        for name in [n for n, _ in self.model.named_parameters() if n in like]:
            keep = like[name]
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

    def evaluate(self) -> dict[str, Any]:
        if self._full_evaluation is None:
            return {}
        return self._full_evaluation(self.model)

    def record(self, point: dict[str, Any]) -> None:
        self.logger.log_point({k: v for k, v in point.items() if not isinstance(v, dict)})

    def sparsity(self) -> float:
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0

    # ------------------------------------------------------------------------- checkpoints
    def resume(self) -> tuple[dict[str, Any] | None, Masks | None]:
        if self.restored is None:
            return None, None
        state = self.restored.state
        masks = self.restored.tensors.get("masks")
        if state["training"] is None:  # taken after a finished step: continue from its weights now
            load_weights(self.model, self.restored.tensors["weights"])
            set_rng_state(state["rng"], self.restored.tensors["rng"])
            self._release()
        return state["driver"], ({k: v.bool() for k, v in masks.items()} if masks is not None else None)

    def keep(self, group: str, tensors: Masks) -> None:
        self._kept[group] = tensors
        self._on_disk.discard(group)

    def kept(self, group: str) -> Masks | None:
        return self._kept.get(group)

    def save(self, state: dict[str, Any], masks: Masks) -> None:
        if self.store is None:
            return
        self._driver_state = json.dumps(state)
        self._boundary = {"reports": len(self.reports), "method": self._method_state()}
        rng_json, rng_tensors = rng_state()
        with self.timer("checkpoint"):
            self._write({"driver": state, "training": None, "rng": rng_json},
                        {"weights": parameters(self.model), "masks": masks, "rng": rng_tensors})
        self._on_disk.add("masks")

    def _method_state(self) -> dict[str, Any]:
        return self.method.state_dict() if self.method is not None else {}

    def _save_training(self, stage: str, trained: torch.nn.Module, progress: TrainingProgress) -> None:
        optimizer_json, optimizer_tensors = optimizer_to_tensors(progress.optimizer)
        rng_json, rng_tensors = rng_state()
        rng_tensors["torch"] = progress.rng
        groups: dict[str, Masks | None] = {"weights": parameters(trained), "optimizer": optimizer_tensors,
                                           "rng": rng_tensors}
        if "masks" in self._on_disk:
            groups["masks"] = None  # the last finished step's masks (a driver's, not necessarily this training's)
        if progress.snapshot is not None:
            groups["snapshot"] = progress.snapshot
        training = {"stage": stage, "step": progress.step, "tokens": progress.tokens, "seconds": progress.seconds,
                    "history": progress.history, "evals": progress.evals, "optimizer": optimizer_json,
                    "scheduler": progress.scheduler}
        driver = json.loads(self._driver_state) if self._driver_state is not None else None
        with self.timer("checkpoint"):
            self._write({"driver": driver, "training": training, "rng": rng_json}, groups)

    def _write(self, data: dict[str, Any], groups: dict[str, Masks | None]) -> None:
        for group, tensors in self._kept.items():
            groups[group] = None if group in self._on_disk else tensors
        data["job"] = {"reports": self.reports, "calibration": self.payload.get("calibration"),
                       "method": self._method_state(), "boundary": self._boundary,
                       "kept": sorted(self._kept), "logger": {"id": self.logger.run_id, "step": self.logger.step},
                       "machine": arithmetic_identity(self.payload.get("device") or {})}
        self.store.save(data, groups)
        self._on_disk.update(self._kept)

    def _training_to_resume(self, stage: str) -> tuple[TrainingProgress | None, Masks | None]:
        """The interrupted training's progress and weights when the checkpoint was taken inside ``stage``."""
        if self.restored is None or self.restored.state["training"] is None:
            return None, None
        training = self.restored.state["training"]
        if training["stage"] != stage:
            return None, None
        tensors = self.restored.tensors
        progress = TrainingProgress(
            step=int(training["step"]), tokens=int(training["tokens"]), seconds=float(training["seconds"]),
            history=training["history"], evals=training["evals"],
            optimizer=optimizer_from_tensors(training["optimizer"], tensors["optimizer"]),
            scheduler=training["scheduler"], rng=tensors["rng"]["torch"], snapshot=tensors.get("snapshot"))
        set_rng_state(self.restored.state["rng"], tensors["rng"])
        weights = tensors["weights"]
        self._release()
        return progress, weights

    def _release(self) -> None:
        """The checkpoint is in use: drop the restored tensors (kept groups live on in ``_kept``)."""
        if self.restored is not None:
            self.restored.tensors.clear()
        self.restored = None

    def check_resumed(self) -> None:
        """After the schedule: a checkpoint that was loaded but never put back would mean skipped steps."""
        if self.restored is not None:
            training = self.restored.state["training"]
            raise CheckpointError(f"the checkpoint taken inside training {training and training['stage']!r} met no "
                                  f"training of that name; delete {self.store.folder} to start again")

