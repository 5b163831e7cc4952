"""The training loop: causal-LM loss, AdamW, warm-up + schedule, accumulation, clipping, masks held.

A short loop of our own rather than ``transformers.Trainer``: the masks must be re-applied after
every optimizer step and the loop must stream per-step records to the caller (W&B); Trainer would
need a callback and a custom optimizer step for each. The pieces that exist are reused:
``transformers.get_scheduler`` for warm-up + cosine/linear/constant, ``torch.nn.utils.clip_grad_norm_``,
``torch.autocast`` for bf16 on CUDA, the model's own gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.config.schema import FinetuneConfig
from prunelab.config.typed import typed
from prunelab.progress import progress
from prunelab.train.masks import MaskGuard

log = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """Where an unfinished training stands: with the model's weights, enough to continue it exactly.

    ``train`` hands one to its ``checkpoint`` callback every ``checkpoint_every`` steps and takes one
    back as ``resume``; the caller stores it (``prunelab.schedules.job`` writes it into the run's
    checkpoint with the weights).
    """

    step: int  # optimizer steps done
    tokens: int
    seconds: float
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    optimizer: dict[str, Any]  # optimizer.state_dict()
    scheduler: dict[str, Any]  # the learning-rate scheduler's state_dict()
    rng: torch.Tensor  # torch's CPU generator (dropout, when a model has it)
    snapshot: dict[str, torch.Tensor] | None = None  # weights_at_snapshot, once taken


def budget_steps(cfg: FinetuneConfig | Mapping[str, Any]) -> int:
    """Optimizer steps the budget allows: ``max_steps``, or ``max_tokens`` over the tokens of one step."""
    cfg = typed(FinetuneConfig, cfg, "finetune")
    if cfg.max_steps:
        return int(cfg.max_steps)
    per_step = cfg.seqlen * cfg.micro_batch * cfg.grad_accum
    return max(1, math.ceil(int(cfg.max_tokens) / per_step))


def make_optimizer(params: list[nn.Parameter], cfg: FinetuneConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, torch's fused kernel where it exists.

    The fused kernel matters for masked training: the default per-tensor AdamW takes the square root
    of every second moment, and on this CPU ``sqrt`` of the exact zeros that pruned entries keep is
    about twice as slow as of other values (experiments/bench_finetune.py); fused AdamW is ~10x faster
    overall and has no such penalty. The arithmetic is AdamW's either way.
    """
    cfg = typed(FinetuneConfig, cfg, "finetune")
    kwargs = dict(lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # a device or dtype the fused kernel does not take
        log.info("fused AdamW unavailable (%s); using the default implementation", err)
        return torch.optim.AdamW(params, **kwargs)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    model: nn.Module,
    windows: torch.Tensor,
    cfg: FinetuneConfig | Mapping[str, Any],
    masks: Mapping[str, torch.Tensor] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    evaluate: Callable[[], dict[str, Any]] | None = None,
    snapshot_step: int | None = None,
    resume: TrainingProgress | None = None,
    checkpoint: Callable[[TrainingProgress], None] | None = None,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Train ``model`` in place on ``windows`` (``[N, seqlen]`` token ids) for the configured budget.

    Args:
        cfg: the ``finetune`` block (``FinetuneConfig`` or a mapping of its fields: lr, weight_decay, warmup_steps, scheduler, micro_batch, grad_accum,
            max_steps / max_tokens, max_grad_norm, bf16, gradient_checkpointing, seed, eval_every).
        masks: keep-masks (parameter name → bool); their pruned entries stay exactly zero.
        on_step: called after every optimizer step with that step's record (W&B streaming).
        evaluate: called every ``eval_every`` steps and at the end; its dict joins the record.
        snapshot_step: keep a CPU copy of the weights after this step (0: before the first) in the
            result's ``weights_at_snapshot`` (lottery tickets rewind to it).
        resume: continue an interrupted training from this point (the model holds its weights then).
        checkpoint: called with the training's progress every ``checkpoint_every`` optimizer steps
            (not after the last: the caller records a finished training itself).

    Returns:
        ``{"steps", "tokens", "seconds", "tokens_per_s", "history": [per-step records], "evals": [...]}``.
    """
    cfg = typed(FinetuneConfig, cfg, "finetune")
    steps = budget_steps(cfg)
    micro, accum = cfg.micro_batch, cfg.grad_accum
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)  # dropout, LoRA's initialisation
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=steps)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    eval_every = int(cfg.eval_every or 0)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    guard = MaskGuard(model, masks or {})
    snapshot: dict[str, torch.Tensor] | None = None
    if snapshot_step == 0 and resume is None:
        snapshot = copy_weights(model)
    tokens, first_step, earlier_seconds = 0, 0, 0.0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.rng)
        history, evals, snapshot = list(resume.history), list(resume.evals), resume.snapshot
        tokens, first_step, earlier_seconds = resume.tokens, resume.step, resume.seconds
        log.info("fine-tuning resumes after step %d of %d", first_step, steps)
    model.train()
    start = time.perf_counter() - earlier_seconds
    try:
        with guard:
            bar = progress(range(first_step, steps), desc="fine-tune", unit="step", total=steps - first_step)
            for step in bar:
                loss_sum = 0.0
                for micro_index in range(accum):
                    # windows in order (their documents were shuffled when packed): the first k steps of a
                    # longer training see exactly what a k-step training sees
                    first = (step * accum + micro_index) * micro
                    batch = windows[torch.arange(first, first + micro) % windows.shape[0]].to(device)
                    with _autocast(device, cfg.bf16):
                        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    (loss / accum).backward()
                    loss_sum += float(loss.detach())
                    tokens += batch.numel()
                guard.mask_gradients()  # before clipping: pruned entries neither count nor move
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, float(cfg.max_grad_norm)))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                guard.reapply()
                if snapshot_step is not None and step + 1 == snapshot_step:
                    snapshot = copy_weights(model)
                elapsed = time.perf_counter() - start
                record = {"step": step + 1, "loss": loss_sum / accum, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / elapsed}
                if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                    model.eval()
                    record["eval"] = evaluate()
                    evals.append({"step": step + 1, **record["eval"]})
                    model.train()
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                if on_step is not None:
                    on_step(record)
                if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                    checkpoint(TrainingProgress(step + 1, tokens, time.perf_counter() - start, history, evals,
                                                optimizer.state_dict(), scheduler.state_dict(), torch.get_rng_state(),
                                                snapshot))
    finally:
        model.eval()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
    seconds = time.perf_counter() - start
    if evaluate is not None and eval_every:
        evals.append({"step": steps, **evaluate()})
    log.info("fine-tuned %d steps, %d tokens in %.1f s (%.0f tokens/s); loss %.4f -> %.4f", steps, tokens, seconds,
             tokens / seconds, history[0]["loss"], history[-1]["loss"])
    result = {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "pruned_weights_held": guard.pruned_count(), "history": history, "evals": evals}
    if snapshot_step is not None:
        if snapshot is None:
            raise ValueError(f"snapshot_step={snapshot_step} is past the budget of {steps} steps")
        result["weights_at_snapshot"] = snapshot
    return result


def copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter, by name (tied ones once)."""
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()}
