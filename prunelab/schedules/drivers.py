"""The schedules: one-shot, iterative (gradual) pruning with fine-tuning, and lottery tickets (IMP).

A driver only orders the steps; the work is done by a :class:`Job` (the runner's, over the real model,
or a fake one in the tests), so the order of steps and the sparsity targets can be checked alone:

- ``oneshot``: prune to the target, fine-tune once (when ``finetune`` is set);
- ``iterative``: for t = 1..n, prune to s_t (``sequences.targets``) with the earlier steps' masks
  frozen (statistics come from the current, fine-tuned weights), then fine-tune with the masks held;
- ``lottery`` (Frankle et al. 2019/2020; for pretrained LMs as in Chen et al. 2020): train, prune a
  fraction ``rate`` of the surviving weights, rewind the survivors to W_k (k = 0: the pretrained
  weights; k > 0: the weights after k steps of the first training), for ``rounds`` rounds; then train
  the ticket. Controls, each from W_k with the same training budget: ``random`` (a random mask with
  the ticket's per-matrix sparsity) and ``oneshot`` (the method's one-shot mask at the final sparsity).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from prunelab.schedules import sequences

log = logging.getLogger(__name__)

KNOWN_SCHEDULES = ("oneshot", "iterative", "lottery")
KNOWN_CONTROLS = ("random", "oneshot")

Masks = dict[str, torch.Tensor]


class Job(Protocol):
    """What a schedule asks of a run."""

    def prune(self, sparsity: float, frozen: Masks | None) -> dict[str, Any]:
        """Prune the current model to ``sparsity`` keeping ``frozen`` pruned; return the engine's report."""

    def masks(self) -> Masks:
        """Keep-masks read off the current weights of the targeted modules."""

    def finetune(self, masks: Masks, snapshot_step: int | None = None) -> dict[str, Any]:
        """Train with ``masks`` held; with ``snapshot_step`` also keep the weights after that step
        (``weights_at_snapshot``)."""

    def weights(self) -> Masks:
        """A copy of the current weights (CPU)."""

    def rewind(self, weights: Masks, masks: Masks) -> None:
        """Set the model to ``weights`` with ``masks`` applied (survivors rewound, pruned at zero)."""

    def random_masks(self, like: Masks, seed: int) -> Masks:
        """Random keep-masks with each matrix's kept count equal to ``like``'s."""

    def checkpoint_eval(self) -> dict[str, Any]:
        """A quick evaluation of the current model (recorded in the trajectory)."""

    def record(self, point: dict[str, Any]) -> None:
        """Stream one trajectory point (W&B)."""

    def sparsity(self) -> float:
        """Achieved sparsity of the targeted modules."""


def run(name: str, job: Job, cfg: Mapping[str, Any], sparsity: float, finetune: bool) -> dict[str, Any]:
    """Run schedule ``name``; return ``{"name", "trajectory": [...], ...}`` for results.json."""
    if name == "oneshot":
        return oneshot(job, sparsity, finetune)
    if name == "iterative":
        return iterative(job, cfg, sparsity, finetune)
    if name == "lottery":
        return lottery(job, cfg)
    raise ValueError(f"schedule={name!r} is not known; allowed: {', '.join(KNOWN_SCHEDULES)}")


def _point(job: Job, **fields: Any) -> dict[str, Any]:
    point = {**fields, "achieved": job.sparsity(), **job.checkpoint_eval()}
    job.record(point)
    return point


def oneshot(job: Job, sparsity: float, finetune: bool) -> dict[str, Any]:
    job.prune(sparsity, None)
    result: dict[str, Any] = {"name": "oneshot", "trajectory": []}
    if finetune:
        result["finetune"] = [job.finetune(job.masks())]
    return result


def iterative(job: Job, cfg: Mapping[str, Any], sparsity: float, finetune: bool) -> dict[str, Any]:
    targets = sequences.targets(str(cfg["rule"]), float(cfg["initial_sparsity"]), sparsity, int(cfg["steps"]))
    trajectory, trainings = [], []
    masks: Masks | None = None
    for step, target in enumerate(targets, 1):
        job.prune(target, masks)
        masks = job.masks()
        if finetune:
            trainings.append(job.finetune(masks))
        trajectory.append(_point(job, step=step, target=target))
        log.info("iterative step %d/%d: target %.4f, achieved %.4f", step, len(targets), target, trajectory[-1]["achieved"])
    return {"name": "iterative", "rule": cfg["rule"], "targets": targets, "trajectory": trajectory, "finetune": trainings}


def lottery(job: Job, cfg: Mapping[str, Any]) -> dict[str, Any]:
    rate, rounds, rewind_step = float(cfg["rate"]), int(cfg["rounds"]), int(cfg["rewind_step"])
    targets = sequences.lottery(rate, rounds)
    rewind_to = job.weights() if rewind_step == 0 else None
    masks = job.masks()  # the pretrained model's: nothing pruned (exact zeros aside)
    trajectory, trainings = [], []
    for round_index, target in enumerate(targets, 1):
        training = job.finetune(masks, snapshot_step=rewind_step if rewind_to is None else None)
        if rewind_to is None:
            rewind_to = training.pop("weights_at_snapshot")
        trainings.append(training)
        trained = job.checkpoint_eval()
        job.prune(target, masks)
        masks = job.masks()
        job.rewind(rewind_to, masks)
        trajectory.append(_point(job, round=round_index, target=target, trained_before_pruning=trained))
        log.info("lottery round %d/%d: %.4f sparse, survivors rewound to W_%d", round_index, rounds, target, rewind_step)
    trainings.append(job.finetune(masks))
    ticket = _point(job, round=rounds, target=targets[-1], branch="ticket")
    result: dict[str, Any] = {"name": "lottery", "rate": rate, "rounds": rounds, "rewind_step": rewind_step,
                              "targets": targets, "trajectory": trajectory, "ticket": ticket, "finetune": trainings,
                              "ticket_masks": masks, "rewind_weights": rewind_to}
    return result


def control(job: Job, branch: str, ticket_masks: Masks, rewind_to: Masks, final_sparsity: float, seed: int) -> dict[str, Any]:
    """Train a control from W_k with the ticket's budget: ``random`` mask or ``oneshot`` mask."""
    if branch == "random":
        masks = job.random_masks(ticket_masks, seed)
        job.rewind(rewind_to, masks)
    elif branch == "oneshot":
        job.rewind(rewind_to, {})
        job.prune(final_sparsity, None)
        masks = job.masks()
    else:
        raise ValueError(f"control {branch!r} is not known; allowed: {', '.join(KNOWN_CONTROLS)}")
    training = job.finetune(masks)
    return {"branch": branch, "finetune": training, **_point(job, branch=branch, target=final_sparsity)}
