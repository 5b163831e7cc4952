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

Every driver keeps its position in a JSON ``state`` and hands it to ``job.save`` after each finished
step (a pruning that a training follows, a training, a round, a control), so a run started again in
the same folder continues after the last finished step (``job.resume``) and ends where an
uninterrupted run ends. A driver never saves without training to follow: a one-shot run without
fine-tuning has nothing worth resuming.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from prunelab.config.schema import ScheduleConfig
from prunelab.config.typed import typed
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

    def finetune(self, masks: Masks, snapshot_step: int | None = None, stage: str = "finetune") -> dict[str, Any]:
        """Train with ``masks`` held; with ``snapshot_step`` also keep the weights after that step
        (``weights_at_snapshot``). ``stage`` names the training within the schedule (a checkpoint
        taken inside it is resumed only by the training of the same name)."""

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

    def evaluate(self) -> dict[str, Any]:
        """The run's full evaluation of the current model (lottery controls)."""

    def resume(self) -> tuple[dict[str, Any] | None, Masks | None]:
        """The schedule state and keep-masks of the last checkpoint, or (None, None). A checkpoint taken
        after a finished step puts its weights back now; one taken inside a training puts them back
        when the training of the same ``stage`` starts."""

    def save(self, state: dict[str, Any], masks: Masks) -> None:
        """Checkpoint after a finished step: ``state`` (JSON), the weights and ``masks``."""

    def keep(self, group: str, tensors: Masks) -> None:
        """Save ``tensors`` with every later checkpoint (they are written once)."""

    def kept(self, group: str) -> Masks | None:
        """What :meth:`keep` stored under ``group``, in this run or the one it resumes."""


def run(name: str, job: Job, cfg: ScheduleConfig | Mapping[str, Any], sparsity: float, finetune: bool,
        seed: int = 0) -> dict[str, Any]:
    """Run schedule ``name``; return ``{"name", "trajectory": [...], ...}`` for results.json."""
    if name == "oneshot":
        return oneshot(job, sparsity, finetune)
    if name == "iterative":
        return iterative(job, cfg, sparsity, finetune)
    if name == "lottery":
        return lottery(job, cfg, seed)
    raise ValueError(f"schedule={name!r} is not known; allowed: {', '.join(KNOWN_SCHEDULES)}")


def _point(job: Job, **fields: Any) -> dict[str, Any]:
    point = {**fields, "achieved": job.sparsity(), **job.checkpoint_eval()}
    job.record(point)
    return point


def oneshot(job: Job, sparsity: float, finetune: bool) -> dict[str, Any]:
    state, masks = job.resume()
    state = state or {"pruned": False, "finetune": None}
    if not state["pruned"]:
        job.prune(sparsity, None)
        state["pruned"] = True
        if finetune:
            masks = job.masks()
            job.save(state, masks)
    result: dict[str, Any] = {"name": "oneshot", "trajectory": []}
    if finetune:
        if state["finetune"] is None:
            masks = masks if masks is not None else job.masks()
            state["finetune"] = job.finetune(masks)
            job.save(state, masks)
        result["finetune"] = [state["finetune"]]
    return result


def iterative(job: Job, cfg: ScheduleConfig | Mapping[str, Any], sparsity: float, finetune: bool) -> dict[str, Any]:
    cfg = typed(ScheduleConfig, cfg, "schedule")
    targets = sequences.targets(cfg.rule, float(cfg.initial_sparsity), sparsity, cfg.steps)
    state, masks = job.resume()
    state = state or {"done": 0, "pruned": False, "trajectory": [], "finetune": []}
    for step in range(state["done"] + 1, len(targets) + 1):
        target = targets[step - 1]
        if not state["pruned"]:
            job.prune(target, masks)
            masks = job.masks()
            state["pruned"] = True
            if finetune:
                job.save(state, masks)
        if finetune:
            state["finetune"].append(job.finetune(masks, stage=f"step {step}"))
        state["trajectory"].append(_point(job, step=step, target=target))
        state.update(done=step, pruned=False)
        job.save(state, masks)
        log.info("iterative step %d/%d: target %.4f, achieved %.4f", step, len(targets), target,
                 state["trajectory"][-1]["achieved"])
    return {"name": "iterative", "rule": cfg.rule, "targets": targets, "trajectory": state["trajectory"],
            "finetune": state["finetune"]}


def lottery(job: Job, cfg: ScheduleConfig | Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """IMP with rewinding, then the ``controls``; the model ends as the ticket (trained)."""
    cfg = typed(ScheduleConfig, cfg, "schedule")
    rate, rounds, rewind_step = float(cfg.rate), cfg.rounds, cfg.rewind_step
    targets = sequences.lottery(rate, rounds)
    state, masks = job.resume()
    state = state or {"round": 0, "trajectory": [], "finetune": [], "ticket": None, "controls": {}}
    rewind_to = job.kept("rewind")
    if rewind_to is None and rewind_step == 0:
        rewind_to = job.weights()  # the pretrained weights (nothing of a resumed run is loaded before round 1 ends)
        job.keep("rewind", rewind_to)
    if masks is None:
        masks = job.masks()  # the pretrained model's: nothing pruned (exact zeros aside)
    for round_index in range(state["round"] + 1, rounds + 1):
        target = targets[round_index - 1]
        training = job.finetune(masks, snapshot_step=rewind_step if rewind_to is None else None,
                                stage=f"round {round_index}")
        if rewind_to is None:
            rewind_to = training.pop("weights_at_snapshot")
            job.keep("rewind", rewind_to)
        state["finetune"].append(training)
        trained = job.checkpoint_eval()
        job.prune(target, masks)
        masks = job.masks()
        job.rewind(rewind_to, masks)
        state["trajectory"].append(_point(job, round=round_index, target=target, trained_before_pruning=trained))
        state["round"] = round_index
        job.save(state, masks)
        log.info("lottery round %d/%d: %.4f sparse, survivors rewound to W_%d", round_index, rounds, target, rewind_step)
    if state["ticket"] is None:
        state["finetune"].append(job.finetune(masks, stage="ticket"))
        state["ticket"] = _point(job, round=rounds, target=targets[-1], branch="ticket")
        job.save(state, masks)
    branches = list(cfg.controls)
    ticket = job.kept("ticket")
    if ticket is None and any(b not in state["controls"] for b in branches):
        ticket = job.weights()
        job.keep("ticket", ticket)
    for branch in branches:
        if branch in state["controls"]:
            continue
        result = control(job, branch, masks, rewind_to, targets[-1], seed)
        result["evaluation"] = job.evaluate()
        job.rewind(ticket, masks)  # the run's own evaluation is the ticket's
        state["controls"][branch] = result
        job.save(state, masks)
    return {"name": "lottery", "rate": rate, "rounds": rounds, "rewind_step": rewind_step, "targets": targets,
            "trajectory": state["trajectory"], "ticket": state["ticket"], "finetune": state["finetune"],
            "controls": state["controls"]}


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
    training = job.finetune(masks, stage=f"control {branch}")
    return {"branch": branch, "finetune": training, **_point(job, branch=branch, target=final_sparsity)}
