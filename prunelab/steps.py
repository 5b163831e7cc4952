"""The steps a run is made of, on the loaded model: one pruning step and one training step.

The runner calls them once (one-shot); the schedules (``prunelab.schedules``) call them again and
again through :class:`prunelab.schedules.job.RunJob`. Each step is timed under its phase name (the
timer adds up repeated phases) so a failure names the phase it happened in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from prunelab.config.schema import ConfigError, PrunelabConfig
from prunelab.data import sources
from prunelab.eval.size import flops_per_token
from prunelab.prune.pattern import Pattern

log = logging.getLogger(__name__)


def needs_calibration(method: Any) -> bool:
    """Methods that score with input statistics need calibration windows (OWL then reuses them)."""
    return bool(method is not None and method.needs)


def calibration_windows(tokenizer: Any, cfg: PrunelabConfig, payload: dict[str, Any], timer: Any) -> torch.Tensor:
    """The run's calibration token windows (cached); what they are is recorded in ``payload["calibration"]``."""
    from prunelab.data.calibration import get_calibration

    with timer("calibration_data"):
        ids, payload["calibration"] = get_calibration(tokenizer, cfg.calib, cfg.data_root, cfg.cache_dir)
    return ids


class PruneStep:
    """Prune the model in place to a sparsity, keeping earlier masks frozen; calibration fetched once."""

    def __init__(self, tokenizer: Any, cfg: PrunelabConfig, method: Any, pattern: Pattern, payload: dict[str, Any],
                 timer: Any, run_dir: Path):
        self.tokenizer, self.cfg, self.method, self.pattern = tokenizer, cfg, method, pattern
        self.payload, self.timer, self.run_dir = payload, timer, run_dir
        self.calib_ids: torch.Tensor | None = None
        self.checked = False

    def __call__(self, model: torch.nn.Module, sparsity: float, frozen: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        from prunelab.prune.engine import check_pattern_fits, prune_model

        if not self.checked:
            with self.timer("check_pattern"):
                try:
                    check_pattern_fits(model, self.pattern, self.cfg.prune.targets, self.cfg.prune.skip)
                except ValueError as error:  # the model's widths are known only once it is loaded
                    raise ConfigError(str(error)) from None
            self.checked = True
        if self.calib_ids is None and needs_calibration(self.method):
            self.calib_ids = calibration_windows(self.tokenizer, self.cfg, self.payload, self.timer)
        with self.timer("prune"):
            report = prune_model(model, self.method, self.calib_ids, float(sparsity), self.pattern,
                                 self.cfg.allocation, self.cfg.prune, frozen, cache_dir=self.cfg.cache_dir)
            if not report.summary.nm_ok:
                raise RuntimeError(f"N:M check failed after pruning: {report.summary.nm_violations}")
        if report.masks is not None:
            from prunelab.io.masks import save_masks

            with self.timer("save_masks"):
                save_masks(report.masks, self.run_dir / "masks.safetensors")
        return report.to_dict()


class StreamedPruneStep:
    """``model.stream=true``: prune the checkpoint on disk layer by layer into ``<run>/model``.

    The model is never loaded whole (``prunelab.prune.engine.prune_streamed``); only the tokenizer
    is, for the calibration windows. Returns the run's metrics: ``pruning`` (with ``streamed``: what
    was read and written), ``sparsity``, measured on each layer before it left memory, and the
    ``perplexity`` of the written model, scored layer by layer from disk when the preset asks for it.
    """

    def __init__(self, cfg: PrunelabConfig, method: Any, pattern: Pattern, payload: dict[str, Any], timer: Any,
                 run_dir: Path):
        self.cfg, self.method, self.pattern, self.payload, self.timer = cfg, method, pattern, payload, timer
        self.out = Path(run_dir) / "model"

    def __call__(self) -> dict[str, Any]:
        import shutil

        from transformers import AutoTokenizer

        from prunelab.models.loading import resolve_device, resolve_dtype
        from prunelab.models.streaming import open_streamed, source_folder
        from prunelab.prune.engine import check_pattern_fits, prune_streamed

        cfg = self.cfg
        dtype = resolve_dtype(cfg.model.dtype, resolve_device(str(cfg.prune.device)))
        with self.timer("load"):
            folder, self.payload["model_source"] = source_folder(cfg.model, cfg.cache_dir)
            if self.out.resolve() == folder.resolve():
                raise ConfigError(f"model.path={folder} is this run's own output folder; stream from another folder")
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
            skeleton = open_streamed(folder, dtype, trust_remote_code=cfg.model.trust_remote_code)
        with self.timer("check_pattern"):
            try:
                check_pattern_fits(skeleton.model, self.pattern, cfg.prune.targets, cfg.prune.skip)
            except ValueError as error:  # the widths are known once the config is read
                raise ConfigError(str(error)) from None
        calib_ids = calibration_windows(tokenizer, cfg, self.payload, self.timer) if needs_calibration(self.method) else None
        from prunelab.io.shards import INDEX

        # An earlier attempt of this run left the folder: a finished model (its evaluation did not finish,
        # or redo=true) is written again; an unfinished one is taken up where it stopped (same key only).
        if self.out.exists() and (cfg.redo or (self.out / INDEX).exists()):
            shutil.rmtree(self.out)
        with self.timer("prune"):
            report = prune_streamed(skeleton, self.out, self.method, calib_ids, float(cfg.sparsity), self.pattern,
                                    cfg.allocation, cfg.prune).to_dict()
        if not report["summary"]["nm_ok"]:
            raise RuntimeError(f"N:M check failed after pruning: {report['summary']['nm_violations']}")
        metrics = {"pruning": report, "sparsity": report.pop("summary")}
        ppl = cfg.eval.perplexity
        if ppl.enabled:
            from prunelab.data.tokens import eval_stream
            from prunelab.eval.perplexity import perplexity_streamed

            seqlen = int(ppl.seqlen or json.loads((self.out / "config.json").read_text())["max_position_embeddings"])
            device = resolve_device(str(cfg.device))
            metrics["perplexity"] = {}
            with self.timer("perplexity"):
                for name in ppl.datasets:
                    stream = eval_stream(sources.eval_source(name, cfg.data_root), tokenizer, seqlen)
                    metrics["perplexity"][name] = perplexity_streamed(self.out, stream, seqlen, ppl.max_windows,
                                                                      ppl.batch_size, device, dtype,
                                                                      cfg.model.trust_remote_code)
        return metrics


def target_masks(model: torch.nn.Module, cfg: PrunelabConfig) -> dict[str, torch.Tensor]:
    """Keep-masks read off the weights of the modules ``prune.targets`` / ``prune.skip`` select."""
    from prunelab.io.masks import masks_from_model

    return masks_from_model(model, list(cfg.prune.targets), list(cfg.prune.skip))


class FinetuneStep:
    """Fine-tune the model as ``cfg.finetune`` says, holding the masks' pruned weights at zero.

    Every training of a run (one after one-shot pruning, one per step or round of a schedule) gets
    the same budget on the same text, so the windows, and the quick evaluation's token stream when
    ``finetune.eval_every`` is set, are built on the first call and reused.
    """

    def __init__(self, tokenizer: Any, cfg: PrunelabConfig, on_step: Callable[[dict[str, Any]], None], timer: Any):
        self.tokenizer, self.cfg, self.on_step, self.timer = tokenizer, cfg, on_step, timer
        self.ft = cfg.finetune
        self.windows: torch.Tensor | None = None
        self.description = ""
        self._evaluate: Callable[..., dict[str, Any]] | None = None

    def _data(self) -> torch.Tensor:
        if self.windows is None:
            from prunelab.train.data import corpus_documents, pack_windows
            from prunelab.train.loop import budget_steps

            ft = self.ft
            with self.timer("finetune_data"):
                documents, self.description = corpus_documents(ft, self.cfg.data_root)
                count = budget_steps(ft) * ft.micro_batch * ft.grad_accum
                self.windows = pack_windows(documents, self.tokenizer, ft.seqlen, count, ft.seed)
        return self.windows

    def _evaluator(self, model: torch.nn.Module) -> Callable[[], dict[str, Any]] | None:
        if not self.ft.eval_every:
            return None
        if self._evaluate is None:
            self._evaluate = training_perplexity(model, self.tokenizer, self.cfg)
        evaluate = self._evaluate
        return lambda: evaluate(model)

    def __call__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor], snapshot_step: int | None = None,
                 resume: Any = None, resume_weights: dict[str, torch.Tensor] | None = None,
                 checkpoint: Callable[[Any, torch.nn.Module], None] | None = None,
                 checkpoint_every: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Returns the trained model (LoRA: the merged one) and the record: budget, per-step history,
        throughput, and the check that every pruned weight is still exactly zero. With ``snapshot_step``
        the record also holds ``weights_at_snapshot`` (the weights after that step; not JSON).

        ``resume`` (a ``TrainingProgress``) with ``resume_weights`` continues an interrupted training;
        ``checkpoint(progress, trained_module)`` is called every ``checkpoint_every`` steps (the module is
        the one being trained: with LoRA, the wrapped model whose adapter weights the progress needs).
        """
        from prunelab.train import lora
        from prunelab.train.loop import train

        ft = self.ft
        windows = self._data()
        with self.timer("finetune"):
            trained = lora.wrap(model, ft.lora) if ft.name == "lora" else model
            if resume_weights is not None:
                from prunelab.io.checkpoint import load_weights

                load_weights(trained, resume_weights)
                resume_weights.clear()  # the caller's copy too: the weights now live in the model only
            on_checkpoint = (lambda progress: checkpoint(progress, trained)) if checkpoint is not None else None
            result = train(trained, windows, ft, masks=None if ft.name == "lora" else masks,
                           on_step=self.on_step, evaluate=self._evaluator(trained), snapshot_step=snapshot_step,
                           resume=resume, checkpoint=on_checkpoint, checkpoint_every=checkpoint_every)
            if ft.name == "lora":
                model = lora.merge(trained, masks)
        revived = revived_weights(model, masks)
        if revived:
            raise RuntimeError(f"{revived} pruned weights are non-zero after fine-tuning: the masks did not hold")
        result.update(corpus=self.description, windows=list(windows.shape),
                      pruned_weights=sum(int((~m).sum()) for m in masks.values()), pruned_weights_revived=revived)
        return model, result


def revived_weights(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """How many entries that ``masks`` prune are non-zero in ``model``."""
    params = dict(model.named_parameters())
    return sum(int((params[name].detach().cpu()[~mask] != 0).sum()) for name, mask in masks.items())


def training_perplexity(model: torch.nn.Module, tokenizer: Any, cfg: PrunelabConfig, windows: int | None = None):
    """A function returning the perplexity on the first ``windows`` (default ``finetune.eval_windows``)
    windows of the first evaluation dataset: the quick check inside trainings and schedules."""
    from prunelab.data.tokens import eval_stream
    from prunelab.eval.perplexity import perplexity

    name = cfg.eval.perplexity.datasets[0]
    seqlen = int(cfg.eval.perplexity.seqlen or model.config.max_position_embeddings)
    stream = eval_stream(sources.eval_source(name, cfg.data_root), tokenizer, seqlen)
    count = int(windows or cfg.finetune.eval_windows)

    def evaluate(current: torch.nn.Module | None = None) -> dict[str, Any]:
        result = perplexity(current if current is not None else model, stream, seqlen, count, progress=False)
        return {f"ppl_{name}": result["ppl"]}

    return evaluate


class StructureStep:
    """Remove heads, MLP neurons or layers for real, as ``cfg.structure`` says (``prune/structured``).

    Returns the record for ``metrics.structure``: what was removed and by which score, the fraction of
    units and of parameters removed, the per-layer widths, whether the config stays a standard one.
    """

    def __init__(self, tokenizer: Any, cfg: PrunelabConfig, payload: dict[str, Any], timer: Any, run_dir: Path):
        self.tokenizer, self.cfg, self.payload, self.timer, self.run_dir = tokenizer, cfg, payload, timer, run_dir

    def _calibration(self) -> torch.Tensor:
        return calibration_windows(self.tokenizer, self.cfg, self.payload, self.timer)

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        from prunelab.models import surgery
        from prunelab.prune.structured import pipeline

        from prunelab.prune.engine import EngineSettings

        st = self.cfg.structure

        compute = EngineSettings.of(self.cfg.prune).compute_device
        batch = int(self.cfg.prune.batch_size)
        if st.name != "layers":
            with self.timer("structure_check"):
                try:  # the model's shapes are known now: refuse an impossible plan before the statistics pass
                    pipeline.check_plan(model, st.name, float(st.fraction), str(st.allocation),
                                        [int(i) for i in st.protect], str(st.heads))
                except ValueError as error:
                    raise ConfigError(str(error)) from None
        params_before = sum(p.numel() for p in model.parameters())
        context = flops_context(self.cfg, model)
        macs_before = flops_per_token(model, context)["total"] // 2
        widths_before = surgery.layer_widths(model)
        with self.timer("structure_scores"):
            if st.name == "layers":
                calib = None if st.score == "last" else self._calibration()
                plan = pipeline.plan_layers(model, st.score, int(st.count), calib, compute)
            else:  # the score's needs (statistics, gradients) are the pipeline's to decide
                plan = pipeline.plan_structure(model, st.name, st.score, float(st.fraction), self._calibration,
                                               str(st.allocation), [int(i) for i in st.protect], str(st.heads),
                                               compute, batch)
        with self.timer("structure_surgery"):
            standard = pipeline.apply_plan(model, plan)
        params_after = sum(p.numel() for p in model.parameters())
        widths = surgery.layer_widths(model)
        if plan.unit == "layers":
            units_before, units_after = len(widths_before), len(widths)
        else:  # heads_neurons: heads + neurons
            keys = [{"heads": "heads", "neurons": "mlp"}[kind] for kind in pipeline.kinds(plan.unit)]
            units_before, units_after = (sum(w[k] for w in ws for k in keys) for ws in (widths_before, widths))
        record = {"unit": plan.unit, "score": plan.score, "removed": plan.removed, "scores": plan.scores,
                  "units_before": units_before, "units_after": units_after,
                  "units_removed_fraction": 1 - units_after / units_before,
                  "params_before": params_before, "params_after": params_after,
                  "params_removed_fraction": 1 - params_after / params_before,
                  "macs_per_token_before": macs_before, "macs_per_token_after": flops_per_token(model, context)["total"] // 2,
                  "macs_context": context, "standard_config": standard, "widths": widths}
        log.info("removed %d of %d %s (%s): %.1f%% of the parameters; config %s", units_before - units_after,
                 units_before, plan.unit, plan.score, 100 * record["params_removed_fraction"],
                 "standard" if standard else "with per-layer widths (prunelab's loader)")
        return record


def flops_context(cfg: PrunelabConfig, model: torch.nn.Module) -> int:
    """Keys attended by the token whose FLOPs are counted: the evaluation's window length."""
    return int(cfg.eval.perplexity.seqlen or model.config.max_position_embeddings)


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> str:
    """The model as it will be evaluated (safetensors + config) and its tokenizer, into ``folder``."""
    config = model.config
    if getattr(config, "prunelab_widths", None) or getattr(config, "prunelab_added_biases", False):
        log.warning("%s: widths that differ per layer or added biases: load it with prunelab (model=hf "
                    "model.path=%s); plain from_pretrained would refuse the shapes or drop the biases", folder, folder)
    from prunelab.io.shards import save_model_folder

    save_model_folder(model, tokenizer, folder)  # replaces another model saved there; umask permissions; no links
    log.info("saved the model to %s", folder)
    return str(folder)
