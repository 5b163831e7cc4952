"""One prunelab job: validate → load → calibrate → prune → evaluate → record.

Everything that can be checked without the model is checked first, so a bad value fails in
seconds. ``results.json`` is written only when every step finished; a failure writes
``failed.json`` instead.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from prunelab.config.schema import ConfigError, validate
from prunelab.data import sources
from prunelab.prune.pattern import Pattern
from prunelab.tracking.results import device_info, git_state, package_versions, write_failure, write_results
from prunelab.tracking.wandb_logger import WandbLogger

log = logging.getLogger(__name__)


class Timer:
    """Collects named wall-clock durations in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{name}_s"] = round(time.perf_counter() - start, 3)


def preflight(cfg: DictConfig) -> tuple[Pattern, Any]:
    """All checks that need no model: values, method params, data availability.

    Returns the parsed pattern and the built pruning method (None for dense).
    """
    pattern = validate(cfg)
    method = None
    if cfg.method.name != "dense":
        from prunelab.prune.methods import build_method

        method = build_method(cfg.method.name, OmegaConf.to_container(cfg.method.params, resolve=True))
        if needs_calibration(cfg, method):
            sources.check_available(cfg.calib.source, cfg.data_root, purpose="calib")
    if cfg.eval.perplexity.enabled:
        for name in cfg.eval.perplexity.datasets:
            sources.check_available(name, cfg.data_root)
    if cfg.eval.zeroshot.enabled:
        from prunelab.eval.tasks.local_data import OfflineDataError
        from prunelab.eval.zeroshot import ZeroShotError, check_zeroshot

        try:
            check_zeroshot(OmegaConf.to_container(cfg.eval.zeroshot, resolve=True))
        except ZeroShotError as error:
            raise ConfigError(str(error)) from error
        except OfflineDataError as error:
            raise sources.DataUnavailableError(str(error)) from error
    return pattern, method


def needs_calibration(cfg: DictConfig, method: Any) -> bool:
    """Methods that score with input statistics need calibration windows (OWL then reuses them)."""
    return bool(method is not None and method.needs)


def run_name(cfg: DictConfig) -> str:
    if cfg.method.name == "dense":
        return f"{cfg.model.name}-dense"
    return f"{cfg.model.name}-{cfg.method.name}-{cfg.pattern if cfg.pattern != 'unstructured' else cfg.sparsity}-{cfg.allocation.name}"


def evaluate(model: torch.nn.Module, tokenizer: Any, cfg: DictConfig, device: torch.device, run_dir: Path, timer: Timer) -> dict[str, Any]:
    """Run every enabled evaluation of the ``eval`` preset and return its metrics."""
    metrics: dict[str, Any] = {}
    ppl_cfg = cfg.eval.perplexity
    seqlen = int(ppl_cfg.seqlen or model.config.max_position_embeddings)  # also the context for FLOPs/token
    if ppl_cfg.enabled:
        from prunelab.data.tokens import eval_stream
        from prunelab.eval.perplexity import perplexity

        metrics["perplexity"] = {}
        with timer("perplexity"):
            for name in ppl_cfg.datasets:
                stream = eval_stream(sources.eval_source(name, cfg.data_root), tokenizer, seqlen)
                metrics["perplexity"][name] = perplexity(model, stream, seqlen, ppl_cfg.max_windows, ppl_cfg.batch_size)
    if cfg.eval.zeroshot.enabled:
        from prunelab.eval.zeroshot import run_zeroshot

        with timer("zeroshot"):
            zeroshot_cfg = OmegaConf.to_container(cfg.eval.zeroshot, resolve=True)
            bootstrap_iters = zeroshot_cfg.pop("bootstrap_iters")
            metrics["zeroshot"] = run_zeroshot(model, tokenizer, zeroshot_cfg, device, bootstrap_iters=bootstrap_iters)
    if cfg.eval.size.enabled:
        from prunelab.eval.size import measure_size

        with timer("size"):
            metrics["size"] = measure_size(model, cfg.eval.size, run_dir, context_len=seqlen)
    if cfg.eval.latency.enabled:
        from prunelab.eval.latency import measure_latency

        with timer("latency"):
            metrics["latency"] = measure_latency(model, cfg.eval.latency, device)
    return metrics


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Execute one job in ``run_dir``; return the payload written to results.json."""
    timer = Timer()
    pattern, method = preflight(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    payload: dict[str, Any] = {
        "run_dir": str(run_dir),
        "name": run_name(cfg),
        "config": resolved,
        "versions": package_versions(),
        "git": git_state(),
    }
    logger = WandbLogger(cfg.logger)
    exit_code = 1
    try:
        logger.start(run_dir, resolved, payload["name"], list(cfg.tags))
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        from prunelab.models.loading import load_model, resolve_device

        device = resolve_device(str(cfg.device))
        payload["device"] = device_info(device)
        with timer("load"):
            model, tokenizer = load_model(cfg.model, device, cfg.cache_dir)
        metrics: dict[str, Any] = {}
        if method is not None:
            metrics["pruning"] = prune(model, tokenizer, cfg, method, pattern, payload, timer, run_dir)
            metrics["sparsity"] = metrics["pruning"].pop("summary")
        metrics.update(evaluate(model, tokenizer, cfg, device, run_dir, timer))
        payload["metrics"] = metrics
        payload["timings"] = timer.seconds
        if cfg.model.get("note"):
            payload["note"] = cfg.model.note
        write_results(run_dir, payload)
        logger.log_summary({"metrics": metrics, "timings": timer.seconds})
        exit_code = 0
        return payload
    except BaseException as error:
        payload["timings"] = timer.seconds
        write_failure(run_dir, payload, error)
        raise
    finally:
        logger.finish(exit_code)


def prune(model: torch.nn.Module, tokenizer: Any, cfg: DictConfig, method: Any, pattern: Pattern, payload: dict[str, Any], timer: Timer, run_dir: Path) -> dict[str, Any]:
    """Calibrate (when the method needs it) and prune the model in place; return the report."""
    from prunelab.prune.engine import check_pattern_fits, prune_model

    engine_cfg = OmegaConf.to_container(cfg.prune, resolve=True)
    try:
        check_pattern_fits(model, pattern, engine_cfg["targets"], engine_cfg["skip"])
    except ValueError as error:  # the model's widths are known only once it is loaded
        raise ConfigError(str(error)) from None
    calib_ids = None
    if needs_calibration(cfg, method):
        from prunelab.data.calibration import get_calibration

        with timer("calibration_data"):
            calib_ids, payload["calibration"] = get_calibration(tokenizer, cfg.calib, cfg.data_root, cfg.cache_dir)
    with timer("prune"):
        report = prune_model(
            model,
            method,
            calib_ids,
            float(cfg.sparsity),
            pattern,
            OmegaConf.to_container(cfg.allocation, resolve=True),
            engine_cfg,
        )
    if report.masks is not None:
        from prunelab.prune.io import save_masks

        save_masks(report.masks, run_dir / "masks.safetensors")
    if not report.summary.nm_ok:
        raise RuntimeError(f"N:M check failed after pruning: {report.summary.nm_violations}")
    return report.to_dict()
