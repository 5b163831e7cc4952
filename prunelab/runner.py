"""One prunelab job: validate → load → calibrate → prune → evaluate → record.

Everything that can be checked without the model is checked first, so a bad value fails in
seconds. ``results.json`` is written only when every step finished; a failure writes
``failed.json`` instead.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, OmegaConf

from prunelab import steps
from prunelab.config.schema import ConfigError, PrunelabConfig, unapplied_warnings, validate, validate_for_model
from prunelab.config.typed import run_config
from prunelab.data import sources
from prunelab.device import arithmetic_identity, device_info
from prunelab.models.facts import ModelFacts, facts_of, read_model_facts
from prunelab.models.loading import gguf_path
from prunelab.prune.pattern import Pattern
from prunelab.tracking.objective import check_numbers, metric_paths, objective, summary_entries
from prunelab.tracking.files import SKIPPED_FILE
from prunelab.tracking.results import (ForeignResults, completed_before, config_fingerprint, git_state, package_versions,
                                        write_failure, write_results, write_skipped)
from prunelab.tracking.wandb_logger import WandbLogger

log = logging.getLogger(__name__)


class Timer:
    """Collects named wall-clock durations in seconds and knows which phase is running."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.phase: str | None = None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        outer, self.phase = self.phase, name
        log.info("── %s", name.replace("_", " "))
        start = time.perf_counter()
        try:
            yield
        finally:  # a phase run again (schedules) adds up
            key = f"{name}_s"
            self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - start, 3)
        self.phase = outer  # left unchanged on an error, so the failure record names the phase


def absolute_paths(cfg: DictConfig) -> None:
    """Make ``data_root`` and ``cache_dir`` absolute, against the folder the command was started in.

    ``PRUNELAB_DATA=../shared/data`` then means the same folder wherever later code runs, and every
    message and results.json shows the full path.
    """
    try:
        start = Path(get_original_cwd())
    except ValueError:  # not inside a Hydra app (tests, the compose API)
        start = Path.cwd()
    for key in ("data_root", "cache_dir"):
        value = cfg.get(key)
        if value:
            cfg[key] = str((start / Path(str(value)).expanduser()).resolve())


def check_writable(folder: str, key: str) -> None:
    """Fail before loading when a folder the run must write into cannot be written."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ConfigError(f"{key}={folder} is not writable ({err.strerror or err}); set {key}=<a writable folder>") from None


def available_memory(device: str) -> int | None:
    """Free bytes where the engine keeps calibration activations (host RAM, or the CUDA device's memory)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        free, _total = torch.cuda.mem_get_info(torch.device(device) if device != "auto" else None)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_method_pattern(method: Any, pattern: Pattern) -> None:
    """SparseGPT chooses N:M groups inside its column blocks, so ``blocksize`` must be a multiple of M."""
    blocksize = getattr(method, "blocksize", None)
    if pattern.is_nm and blocksize is not None and int(blocksize) % pattern.m:
        fit = max(pattern.m, int(blocksize) - int(blocksize) % pattern.m)
        raise ConfigError(f"method.params.blocksize={blocksize} must be a multiple of M={pattern.m} for "
                          f"pattern={pattern}; set method.params.blocksize={fit}")


def preflight_tokenizer(conf: PrunelabConfig) -> Any | None:
    """The model's tokenizer without its weights: a local folder's, a GGUF model's converted folder's, else its
    GGUF file's (seconds); None for a hub id (the load fetches it) or a tokenizer that cannot be read."""
    from transformers import AutoTokenizer

    from prunelab.models.loading import cache_folder, gguf_sha256

    model = conf.model
    try:
        if model.source == "hf":
            folder = Path(str(model.path)).expanduser()
            if not folder.is_dir():
                return None
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=bool(model.trust_remote_code))
        path = gguf_path(model)
        converted = cache_folder(str(model.name), gguf_sha256(path), conf.cache_dir)
        if converted.is_dir():
            return AutoTokenizer.from_pretrained(str(converted))
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # a damaged or remote-code tokenizer: the load says what is wrong
        log.debug("tokenizer not readable before loading: %s", err)
        return None


def _local(data_root: str | None, relative: Path) -> bool:
    """Whether the data root holds ``relative`` (only local data is read to be checked, never the hub's)."""
    return bool(data_root) and (Path(str(data_root)).expanduser() / relative).is_file()


def check_token_counts(conf: PrunelabConfig, max_positions: int | None, needs_calibration: bool) -> None:
    """Lengths the local data must be long enough for: a calibration document longer than ``calib.seqlen``,
    a fine-tuning corpus of ``finetune.seqlen`` tokens, an evaluation stream of one window.

    Text is tokenized only where its size leaves the answer open, with the tokenizer read on first need.
    """
    from prunelab.data.calibration import CalibrationError, check_window_fits, local_calibration_source
    from prunelab.train.data import TrainDataError, check_corpus_holds_window, corpus_documents

    tokenizer = functools.cache(lambda: preflight_tokenizer(conf))
    calib = local_calibration_source(conf.calib.source, conf.data_root) if needs_calibration else None
    ft = conf.finetune
    local_corpus = ft.corpus == "files" or (ft.corpus == "c4" and _local(conf.data_root, sources.C4_VALIDATION))
    try:
        if calib is not None:
            check_window_fits(calib, tokenizer, int(conf.calib.seqlen))
        if ft.name != "none" and local_corpus:
            check_corpus_holds_window(corpus_documents(ft, conf.data_root)[0], int(ft.seqlen), tokenizer)
    except (CalibrationError, TrainDataError) as error:
        raise ConfigError(str(error)) from None
    ppl = conf.eval.perplexity
    seqlen = ppl.seqlen or max_positions
    for name in ppl.datasets if ppl.enabled and seqlen else []:
        if _local(conf.data_root, sources.WIKITEXT2_TEST if name == "wikitext2" else sources.C4_VALIDATION):
            check_stream_holds_window(sources.eval_source(name, conf.data_root), int(seqlen), tokenizer,
                                      from_model=ppl.seqlen is None)


def check_stream_holds_window(source: sources.TextSource, seqlen: int, tokenizer: Any, from_model: bool = False) -> None:
    """Refuse an evaluation ``seqlen`` longer than the source's token stream (it would score no window)."""
    from prunelab.data.calibration import size_verdict
    from prunelab.data.tokens import eval_stream

    verdict = size_verdict(sum(len(d.encode()) + 2 for d in source.documents), 1, seqlen)  # + the separators
    if verdict is None:
        tok = tokenizer()
        verdict = tok is None or eval_stream(source, tok, seqlen).numel >= seqlen
    if not verdict:
        key = (f"eval.perplexity.seqlen=null (the model's max_position_embeddings, {seqlen})" if from_model
               else f"eval.perplexity.seqlen={seqlen}")
        raise ConfigError(f"{key} is longer than the whole {source.name} evaluation stream ({source.description}), "
                          f"so no window can be scored; set eval.perplexity.seqlen to fewer tokens (2048)")


@dataclass
class Checked:
    """What preflight established: the run's typed config, the parsed pattern, the method (None for
    dense), the model's shapes (None when its config is not readable before loading) and warnings
    about unusual settings."""

    conf: PrunelabConfig
    pattern: Pattern
    method: Any
    facts: ModelFacts | None
    warnings: list[str]


def preflight(cfg: DictConfig) -> Checked:
    """All checks that need no model weights: values, method params, data, folders, model shapes.

    The keys and values are checked on the composed DictConfig; everything after that reads the
    typed config (``Checked.conf``) the rest of the run is given.
    """
    absolute_paths(cfg)
    pattern = validate(cfg)
    conf = run_config(cfg)
    method = None
    if conf.method.name != "dense":
        from prunelab.prune.methods import build_method

        try:
            method = build_method(conf.method.name, dict(conf.method.params))
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None
        check_method_pattern(method, pattern)
        if steps.needs_calibration(method):
            sources.check_available(conf.calib.source, conf.data_root, purpose="calib")
    if conf.eval.perplexity.enabled:
        for name in conf.eval.perplexity.datasets:
            sources.check_available(name, conf.data_root)
    if conf.eval.zeroshot.enabled:
        from prunelab.eval.tasks.local_data import OfflineDataError
        from prunelab.eval.zeroshot import ZeroShotError, check_zeroshot

        try:
            check_zeroshot(conf.eval.zeroshot)
        except ZeroShotError as error:
            raise ConfigError(str(error)) from error
        except OfflineDataError as error:
            raise sources.DataUnavailableError(str(error)) from error
    check_writable(conf.cache_dir, "cache_dir")
    warnings = unapplied_warnings(conf)
    facts = read_model_facts(conf.model, gguf_path(conf.model) if conf.model.source == "gguf_package" else None, conf.cache_dir)
    if facts is not None:
        train_memory = available_memory(str(conf.device)) if conf.finetune.name != "none" else None
        warnings += validate_for_model(conf, facts, available_memory(str(conf.prune.device)),
                                       steps.needs_calibration(method), train_memory)
    elif conf.allocation.name == "explicit":
        log.warning("the model's layer count is not known before loading: allocation.layers is checked after the load")
    check_token_counts(conf, facts.max_positions if facts is not None else None, steps.needs_calibration(method))
    for warning in warnings:
        log.warning("%s", warning)
    return Checked(conf, pattern, method, facts, warnings)


def run_name(cfg: DictConfig | PrunelabConfig) -> str:
    if cfg.structure.name != "none":
        return f"{cfg.model.name}-{cfg.structure.name}-{cfg.structure.score}"
    if cfg.method.name == "dense":
        return f"{cfg.model.name}-dense"
    return f"{cfg.model.name}-{cfg.method.name}-{cfg.pattern if cfg.pattern != 'unstructured' else cfg.sparsity}-{cfg.allocation.name}"


def evaluate(model: torch.nn.Module, tokenizer: Any, cfg: PrunelabConfig, device: torch.device, run_dir: Path, timer: Timer) -> dict[str, Any]:
    """Run every enabled evaluation of the ``eval`` preset and return its metrics."""
    metrics: dict[str, Any] = {}
    ppl_cfg = cfg.eval.perplexity
    seqlen = steps.flops_context(cfg, model)  # the evaluation window, also the context for FLOPs/token
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
            metrics["zeroshot"] = run_zeroshot(model, tokenizer, cfg.eval.zeroshot, device,
                                               bootstrap_iters=cfg.eval.zeroshot.bootstrap_iters)
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
    """Execute one job in ``run_dir``; return the payload written to results.json.

    Any failure or interruption, from the first check on, leaves ``failed.json`` naming the phase.
    ``cfg`` is the composed DictConfig; after preflight the run reads its typed form.
    """
    timer = Timer()
    payload: dict[str, Any] = {"run_dir": str(run_dir), "name": run_name(cfg)}
    logger = WandbLogger(cfg.logger)
    exit_code = 1
    try:
        with timer("preflight"):
            checked = preflight(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)  # the record, as composed
        conf = checked.conf  # the typed config, from here on
        fingerprint = config_fingerprint(resolved)  # keys both the skip below and the checkpoint
        previous = completed_before(run_dir, fingerprint, replace=conf.redo)
        if previous is not None:  # a re-run of a finished job (a sweep run again): nothing to do
            write_skipped(run_dir, fingerprint)
            log.info("skipped: %s holds this config's complete results.json (redo=true runs it again)", run_dir)
            earlier, now = (previous.get("git") or {}).get("sha"), git_state().get("sha")
            if earlier != now:
                log.warning("the skipped results were computed at commit %s, this checkout is %s; redo=true "
                            "recomputes them", earlier, now)
            previous["objective"] = objective(previous.get("metrics", {}), metric_paths(conf))
            exit_code = 0
            return previous
        (Path(run_dir) / SKIPPED_FILE).unlink(missing_ok=True)
        from prunelab.models.loading import resolve_device

        with timer("setup"):
            payload.update(config=resolved, versions=package_versions(), git=git_state())
            if checked.warnings:
                payload["warnings"] = checked.warnings
            store = checkpoint_store(conf, fingerprint, checked, run_dir)
            saved = store.read_state() if store is not None else None
            if saved is not None:
                payload["resumed_from"] = {"checkpoint": str(store.folder), "generation": saved["generation"],
                                           "saved": saved["saved"], "inside_training": saved["data"]["training"] is not None}
            logger.start(run_dir, resolved, payload["name"], list(conf.tags),
                         resume=saved["data"]["job"]["logger"] if saved is not None else None)
            random.seed(conf.seed)
            torch.manual_seed(conf.seed)
            device = resolve_device(str(conf.device))
            payload["device"] = device_info(device)
            if saved is not None:
                warn_other_machine(saved["data"]["job"].get("machine"), payload)
        if conf.model.stream:  # never loaded whole: pruned from disk into <run>/model, one layer in memory
            metrics = steps.StreamedPruneStep(conf, checked.method, checked.pattern, payload, timer, run_dir)()
        else:
            metrics = run_in_memory(conf, checked, payload, timer, logger, run_dir, device, store, saved)
        payload["metrics"] = metrics
        with timer("record"):  # a NaN, inf or missing metric fails the run (failed.json keeps the metrics)
            check_numbers(metrics, conf)
        payload["objective"] = objective(metrics, metric_paths(conf))
        payload["timings"] = timer.seconds
        if conf.model.note:
            payload["note"] = conf.model.note
        write_results(run_dir, payload)
        if store is not None and not conf.checkpoint.keep:
            store.remove()
        logger.log_summary({"metrics": metrics, "timings": timer.seconds})
        logger.log_summary(summary_entries(payload["objective"]))
        exit_code = 0
        return payload
    except ForeignResults as error:  # the folder is another run's: leave it exactly as it is
        raise ConfigError(str(error)) from None
    except BaseException as error:
        payload["timings"] = timer.seconds
        write_failure(run_dir, payload, error, phase=timer.phase)
        raise
    finally:
        logger.finish(exit_code)


def run_in_memory(conf: PrunelabConfig, checked: Checked, payload: dict[str, Any], timer: Timer, logger: WandbLogger,
                  run_dir: Path, device: torch.device, store: Any, saved: Any) -> dict[str, Any]:
    """Load the model, then structure / prune / fine-tune as configured, then evaluate; returns the metrics."""
    from prunelab.models.loading import load_model, model_provenance

    with timer("load"):
        model, tokenizer = load_model(conf.model, device, conf.cache_dir)
        payload["model_source"] = model_provenance(model)
        if checked.facts is None:  # the config was not readable before the load: check now
            payload.setdefault("warnings", []).extend(validate_for_model(conf, facts_of(model.config), None, False))
    metrics: dict[str, Any] = {}
    if conf.structure.name != "none":
        metrics["structure"] = steps.StructureStep(tokenizer, conf, payload, timer, run_dir)(model)
    if checked.method is not None:
        model, scheduled = run_schedule(model, tokenizer, conf, checked, payload, timer, logger, run_dir, device,
                                        store, resume=saved is not None)
        metrics.update(scheduled)
    elif conf.finetune.name != "none":
        model, metrics["finetune"] = steps.FinetuneStep(tokenizer, conf, logger.log_step, timer)(model, {})
    if conf.structure.name != "none" and conf.structure.save:
        with timer("save_model"):
            metrics["structure"]["saved"] = steps.save_model(model, tokenizer, run_dir / "model")
    metrics.update(evaluate(model, tokenizer, conf, device, run_dir, timer))
    return metrics


def warn_other_machine(saved: dict[str, Any] | None, payload: dict[str, Any]) -> None:
    """A checkpoint written on another kind of machine resumes correctly, but not bit for bit: say so."""
    now = arithmetic_identity(payload["device"])
    if saved is not None and saved != now:
        differs = ", ".join(f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in now if saved.get(key) != now.get(key))
        message = (f"resuming a checkpoint written on another machine ({differs}): the run goes on, but its numbers "
                   "are not bit for bit those of an uninterrupted run")
        log.warning(message)
        payload.setdefault("warnings", []).append(message)


def checkpoint_store(cfg: PrunelabConfig, fingerprint: str, checked: Checked, run_dir: Path):
    """The run folder's checkpoint store, when the run trains or prunes step by step (else None)."""
    if not cfg.checkpoint.enabled or checked.method is None:
        return None
    if cfg.schedule.name == "oneshot" and cfg.finetune.name == "none":
        return None  # nothing a restart would save
    from prunelab.io.checkpoint import CheckpointStore

    return CheckpointStore(run_dir / "checkpoint", fingerprint)


def run_schedule(model: torch.nn.Module, tokenizer: Any, cfg: PrunelabConfig, checked: Checked, payload: dict[str, Any],
                 timer: Timer, logger: WandbLogger, run_dir: Path, device: torch.device, store: Any = None,
                 resume: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Prune (and fine-tune) as ``cfg.schedule`` says; returns the model to evaluate and its metrics.

    One-shot keeps today's record (``pruning``, ``sparsity``, ``finetune``); iterative and lottery add
    ``schedule`` with the trajectory, and lottery's controls, each evaluated with the run's preset.
    With ``store`` the schedule checkpoints after every finished step; ``resume`` continues its checkpoint.
    """
    from prunelab.schedules import drivers
    from prunelab.schedules.job import RunJob

    def evaluate_control(current: torch.nn.Module) -> dict[str, Any]:
        return evaluate(current, tokenizer, cfg, device, run_dir, timer)

    job = RunJob(model, tokenizer, cfg, checked.method, checked.pattern, payload, timer, logger, run_dir,
                 store=store, resume=resume, checkpoint_every=cfg.checkpoint.every or 0, evaluate=evaluate_control)
    finetuning = cfg.finetune.name != "none"
    schedule = drivers.run(cfg.schedule.name, job, cfg.schedule, float(cfg.sparsity), finetuning, int(cfg.seed))
    job.check_resumed()
    # the schedule's own last pruning (a lottery's oneshot control prunes after the last round)
    last = int(cfg.schedule.rounds) - 1 if cfg.schedule.name == "lottery" else -1
    metrics: dict[str, Any] = {"pruning": dict(job.reports[last])}
    metrics["sparsity"] = metrics["pruning"].pop("summary")
    if cfg.schedule.name == "oneshot":
        if finetuning:
            metrics["finetune"] = schedule["finetune"][-1]
        return job.model, metrics
    logger.log_table(f"schedule/{cfg.schedule.name}", ["point", "target", "achieved", "ppl"],
                     [[i, p.get("target"), p.get("achieved"), next((v for k, v in p.items() if k.startswith("ppl_")), None)]
                      for i, p in enumerate(schedule["trajectory"], 1)])
    metrics["schedule"] = schedule
    return job.model, metrics
