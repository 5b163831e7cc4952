"""The layer-wise pruning driver: one decoder layer on the compute device at a time.

A run:

1. records every decoder layer's inputs with one backbone forward over the calibration windows
   (``prune.batch_size`` per forward) — skipped for methods that need no statistics (magnitude,
   random), which run without any forward pass;
2. asks ``prunelab.prune.allocation`` for each layer's and each module's target; an allocation
   that needs the dense model's scores (OWL) gets one walk over the layers (:meth:`score_pass`);
3. walks the layers in order on the layer conveyor (``prunelab.prune.walk``); for each layer,
   hooks its targeted Linear/Conv1D modules (``prunelab.prune.stats``), runs the calibration
   batches through it accumulating what the method ``needs``, asks the method for each module's
   new weight and writes it back (dtype and layout kept). ``prune.sequential``: the pruned layer
   is run again, so the next layer calibrates on what the pruned model really feeds it;
   otherwise the dense outputs of the statistics pass go on.

The engine names no method and no allocation: it asks the method (``needs``, ``outlier_needs``,
``outlier_scores``, ``global_scope``) and the allocation module.

Passes are not wasted: modules fed the same tensor (q/k/v, gate/up) share one ``InputStats``;
when the statistics pass's outputs are thrown away (sequential mode, or the last layer, whose
outputs nothing reads) the layer's last Linear only records its input (see ``walk``); the last
layer is never re-run. A sequential run thus makes 2L - 1 layer passes over the calibration set
(L with statistics hooks, L - 1 re-runs of pruned layers), plus L for OWL's pre-pass;
``experiments/bench_prune.py`` measures it against :func:`layerwise_forward`.

:func:`prune_streamed` runs the same walk on a model that is never loaded whole: each decoder layer
is read from the checkpoint's safetensors when the walk reaches it, pruned, measured, written as
one shard of the output checkpoint and dropped (``prunelab.models.streaming``);
``experiments/bench_streaming.py`` records its time and peak memory up to a 7B shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.config.schema import AllocationConfig, PruneEngineConfig
from prunelab.config.typed import typed
from prunelab.models.adapters import DecoderAdapter, PrunableModule, get_adapter, select_modules
from prunelab.data.tokens import ids_fingerprint
from prunelab.models.loading import ModelLoadError, resolve_device
from prunelab.models.streaming import StreamedLayers, StreamedModel, open_streamed
from prunelab.prune import allocation as alloc
from prunelab.prune.methods.base import InputStats, PruneResult, PruningMethod
from prunelab.prune.pattern import Pattern
from prunelab.device import arithmetic_identity
from prunelab.prune.prepass_cache import PrepassCache, parts_digest, weights_digest
from prunelab.prune.stats import collect_stats
from prunelab.prune.stats_cache import StatsCache, StatsEntry
from prunelab.prune.summary import ModuleRecord, PruneReport, SparsityTally, measure_sparsity
from prunelab.prune.timing import PhaseTimer, sync
from prunelab.prune.walk import LayerStop, LayerWalk

log = logging.getLogger(__name__)

ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(PruneEngineConfig))


def _compute_device(device: str) -> torch.device:
    """``prune.device`` as a torch device (``auto`` → CUDA when available); ValueError when CUDA is missing."""
    try:
        return resolve_device(device)
    except ModelLoadError:
        raise ValueError(f"prune.device={device} but CUDA is not available; use prune.device=cpu or auto") from None


@dataclass
class EngineSettings(PruneEngineConfig):
    """The ``prune:`` block, checked and normalised.

    Its fields and defaults are ``PruneEngineConfig``'s (the one list of engine settings);
    ``compute_device`` is ``device`` resolved (``auto`` → CUDA when available).
    """

    compute_device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        batch_size = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"prune.batch_size={batch_size!r} must be a positive integer")
        self.sequential = bool(self.sequential)
        self.device = str(self.device)
        self.targets = [str(t) for t in self.targets]
        self.skip = [str(s) for s in self.skip]
        self.save_masks = bool(self.save_masks)
        self.share_stats = bool(self.share_stats)
        self.compute_device = _compute_device(self.device)

    @classmethod
    def of(cls, engine: PruneEngineConfig | Mapping[str, Any] | None) -> "EngineSettings":
        """From the ``prune`` config block (typed, or a mapping of some of its fields; None = defaults)."""
        if isinstance(engine, cls):
            return engine
        block = typed(PruneEngineConfig, engine, "prune", what="an engine setting")
        return cls(**{name: getattr(block, name) for name in ENGINE_KEYS})


def check_pattern_fits(
    model: nn.Module, pattern: Pattern | str, targets: Sequence[str] = (".*",), skip: Sequence[str] = ()
) -> None:
    """Raise ValueError, naming every module and width, when an N:M pattern cannot tile a target's inputs.

    Cheap (no forward pass): call it right after loading the model.
    """
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    if not pattern.is_nm:
        return
    misfits = [m for m in select_modules(model, targets, skip) if m.in_features % pattern.m]
    if misfits:
        shown = ", ".join(f"{m.full_name} (in_features={m.in_features})" for m in misfits[:6])
        more = f" and {len(misfits) - 6} more" if len(misfits) > 6 else ""
        names = ",".join(sorted({m.name.rsplit(".", 1)[-1] for m in misfits}))
        raise ValueError(
            f"pattern={pattern} needs every targeted module's input width divisible by M={pattern.m}, "
            f"but {shown}{more} are not; pick an M that divides them or leave them out, e.g. "
            f"'prune.skip=[{names}]'"
        )


def _check_calibration(calib_ids: torch.Tensor | None, method: PruningMethod) -> None:
    if calib_ids is None:
        raise ValueError(f"method={method.name} needs calibration data ({sorted(method.needs)}); pass calib_ids")
    if calib_ids.dim() != 2 or calib_ids.numel() == 0 or calib_ids.dtype.is_floating_point:
        raise ValueError(
            f"calib_ids must be token ids shaped [nsamples, seqlen], got {tuple(calib_ids.shape)} {calib_ids.dtype}"
        )


class LayerwisePruner:
    """One pruning run over a model; use :func:`prune_model` unless you need the pieces."""

    def __init__(
        self,
        model: nn.Module,
        method: PruningMethod,
        sparsity: float,
        pattern: Pattern,
        allocation: AllocationConfig | Mapping[str, Any],
        settings: EngineSettings,
        frozen: Mapping[str, torch.Tensor] | None = None,
        prepass_cache: PrepassCache | None = None,
        streamed: StreamedLayers | None = None,
        stats_cache: StatsCache | None = None,
    ):
        if streamed is not None and prepass_cache is not None:
            raise ValueError("a streamed model has no weights in memory to key a pre-pass cache with; pass no cache")
        self.model = model
        self.stats_cache = stats_cache
        self.stats_record: dict[str, Any] | None = None  # results.json: pruning.stats_cache
        self._weights: str | None = None  # sha256 of the targeted weights before pruning (cache keys)
        self.streamed = streamed
        self.tally = SparsityTally(pattern) if streamed is not None else None  # measured while each layer is resident
        self.streamed_record: dict[str, Any] | None = None
        self.prepass_cache = prepass_cache
        self.prepass_record: dict[str, Any] | None = None  # what the cache said (results.json: pruning.prepass_cache)
        self._calib_fingerprint: str | None = None
        self._calib_shape: list[int] | None = None
        self.frozen = dict(frozen or {})
        self.method = method
        self.pattern = pattern
        self.sparsity = pattern.sparsity if pattern.is_nm else alloc.check_sparsity(sparsity)
        self.allocation = alloc.settings(allocation)
        self.settings = settings
        self.device = settings.compute_device
        self.adapter: DecoderAdapter = get_adapter(model)
        self.selected = select_modules(model, settings.targets, settings.skip)
        self.by_layer: dict[int, list[PrunableModule]] = defaultdict(list)
        for m in self.selected:
            self.by_layer[m.layer].append(m)
        self.timer = PhaseTimer(self.device)
        self.walk = LayerWalk(self.adapter, self.device, self.timer, residence=streamed)
        self.records: list[ModuleRecord] = []
        self.masks: dict[str, torch.Tensor] | None = {} if settings.save_masks else None
        self.outlier_ratios: list[float | None] | None = None
        alloc.check_allocation(self.allocation, pattern, method.global_scope)

    @property
    def needs_data(self) -> bool:
        return bool(self.method.needs)

    @property
    def layer_forwards(self) -> int:
        """Decoder-layer passes over the whole calibration set so far."""
        return self.walk.forwards

    # ----------------------------------------------------------------------------- allocation pre-pass
    def score_pass(self, reduce: alloc.LayerReduce, phase: str, desc: str, key: str | None = None) -> list[float | None]:
        """One walk over the (still dense) model: ``reduce`` of each layer's ``method.outlier_scores``.

        The :data:`prunelab.prune.allocation.ScorePass` an allocation may ask for. With calibration
        data the scores see the inputs' statistics (``method.outlier_needs``); without, the weights
        alone. None for layers without a targeted module. ``key`` names the reduction (with its
        parameters); with a pre-pass cache, a pass over the same weights and windows is read back.
        """
        parts = self._prepass_parts(key) if self.prepass_cache is not None and key is not None else None
        if parts is not None:
            cached = self.prepass_cache.load(parts, self.adapter.num_layers)
            self.prepass_record = {"what": key, "key": self.prepass_cache.key(parts), "hit": cached is not None}
            if cached is not None:
                log.info("%s: read from the pre-pass cache %s", desc, self.prepass_cache.path(self.prepass_record["key"]))
                return cached
        results = self._score_walk(reduce, phase, desc)
        if parts is not None:
            self.prepass_cache.save(parts, results)
        return results

    def _prepass_parts(self, key: str) -> dict[str, Any]:
        """What a pre-pass reads, which its cache key hashes (``prunelab.prune.prepass_cache``)."""
        return {"what": key, **self._input_parts(), "method": self.method.name, "params": dict(self.method.params),
                "needs": sorted(str(n) for n in self.method.outlier_needs)}

    def _input_parts(self) -> dict[str, Any]:
        """What a walk over the unpruned model reads: the cache keys' common parts."""
        if self._weights is None:
            with self.timer("cache_key"):
                # a streamed model's weights are on disk: the source files stand for them
                self._weights = weights_digest(self.model) if self.streamed is None else self._source_identity()
        import transformers

        dtype = str(self.selected[0].get_weight().dtype) if self.selected else None
        config = getattr(self.model, "config", None)
        return {"weights": self._weights, "calibration": self._calib_fingerprint, "calib_shape": self._calib_shape,
                "model_class": type(self.model).__name__,
                # everything that shapes the forward besides the weights (rope, eps, attention kernel)
                "config": hashlib.sha256(config.to_json_string().encode()).hexdigest() if config is not None else None,
                "attn_implementation": getattr(config, "_attn_implementation", None),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                # a cache folder shared by different machines (NFS) gives each kind its own entries:
                # SIMD level, CPU model and threads decide the last bits of every sum
                "machine": arithmetic_identity(self.device),
                "batch_size": self.settings.batch_size, "device": str(self.device), "dtype": dtype,
                "layers": self.adapter.num_layers, "targets": list(self.settings.targets), "skip": list(self.settings.skip)}

    def _source_identity(self) -> str:
        """The streamed checkpoint's files: name, size and modification time each (hashing 27 GB would take minutes)."""
        folder = self.streamed.streamed.reader.folder
        files = sorted(set(self.streamed.streamed.reader.weight_map.values()))
        stats = {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in files}
        return hashlib.sha256(json.dumps({"folder": str(folder.resolve()), "files": stats}, sort_keys=True).encode()).hexdigest()

    def _stream_key(self, layer_targets: Sequence[float]) -> str:
        """What a streamed run's written layers depend on, as one digest (``StreamedLayers.resume``)."""
        parts = {"what": "stream", **self._input_parts(), "method": self.method.name, "params": dict(self.method.params),
                 "pattern": str(self.pattern), "sparsity": self.sparsity, "layer_targets": list(layer_targets),
                 "allocation": alloc.describe(self.allocation, self.method.global_scope),
                 "sequential": self.settings.sequential, "written_dtype": str(self.streamed.streamed.dtype)}
        return parts_digest(parts)

    def _stats_entry(self) -> StatsEntry | None:
        """The dense-statistics cache entry, when this run can share one (non-sequential, calibrated)."""
        if (self.stats_cache is None or not self.settings.share_stats or self.settings.sequential or not self.needs_data
                or self.frozen or self.streamed is not None):
            return None  # the dense model's statistics are this run's only when nothing was pruned before
        try:
            entry = self.stats_cache.open({"what": "dense-stats", **self._input_parts(),
                                           "needs": sorted(str(n) for n in self.method.needs)}, self.adapter.num_layers)
        except OSError as err:  # an optimisation only: a cache folder that cannot be written costs the sharing
            log.warning("stats cache %s is not usable (%s); this run computes its statistics", self.stats_cache.folder, err)
            return None
        self.stats_record = entry.record()
        if entry.hit:
            log.info("dense statistics read from the stats cache %s: no calibration forward", entry.folder)
        return entry

    def _score_walk(self, reduce: alloc.LayerReduce, phase: str, desc: str) -> list[float | None]:
        results: list[float | None] = []

        def visit(stop: LayerStop) -> list[torch.Tensor] | None:
            modules = self.by_layer.get(stop.index, [])
            outputs: list[torch.Tensor] | None = None
            stats: Mapping[str, InputStats] = {}
            if stop.inputs is not None:
                with self.timer(phase), collect_stats(modules, self.method.outlier_needs, self.device) as collector:
                    outputs = self.walk.forward(stop, collector, keep_outputs=not stop.last)
                stats = collector.stats
            with self.timer(phase):
                scores = [self.method.outlier_scores(mod.get_weight(), stats.get(mod.name)) for mod in modules]
                results.append(reduce(scores) if scores else None)
            return outputs

        self.walk.run(visit, desc, keep_inputs=True)
        return results

    # ----------------------------------------------------------------------------- pruning
    def _prune_layer(self, stop: LayerStop, targets: Mapping[str, float],
                     entry: StatsEntry | None = None) -> list[torch.Tensor] | None:
        """Prune the layer at ``stop``; return the next layer's inputs (None without data, or for the last layer).

        ``entry``: a stats cache entry; a hit gives the statistics (no forward), else they are stored in it.
        """
        modules = self.by_layer.get(stop.index, [])
        if entry is not None and entry.hit:
            with self.timer("stats"):
                stats = entry.load_layer(stop.index, modules, self.method.needs, self.device)
            self._solve(modules, stats, targets)
            return None
        if stop.inputs is None:  # no statistics needed: no forward at all
            self._solve(modules, {}, targets)
            return None
        if not modules:
            if stop.last:
                return None
            with self.timer("forward"):
                return self.walk.forward(stop)
        # The statistics pass's outputs are thrown away when the pruned layer is re-run
        # (sequential) or when nothing reads them (last layer).
        discard = self.settings.sequential or stop.last
        with self.timer("stats"), collect_stats(modules, self.method.needs, self.device) as collector:
            outputs = self.walk.forward(stop, collector, keep_outputs=not discard)
        if entry is not None:  # before the method sees them: a solver may work in place
            with self.timer("cache_write"):
                entry.save_layer(stop.index, collector.stats, collector.shared_with)
        self._solve(modules, collector.stats, targets)
        del collector
        if stop.last:
            return None
        if self.settings.sequential:
            with self.timer("forward"):
                outputs = self.walk.forward(stop)
        return outputs

    def _solve(self, modules: Sequence[PrunableModule], stats: Mapping[str, InputStats], targets: Mapping[str, float]) -> None:
        users = Counter(id(stats[mod.name]) for mod in modules if mod.name in stats)
        for mod in modules:
            entry = stats.get(mod.name)
            if entry is not None:  # the last module to read them may reuse their storage
                entry.disposable = users[id(entry)] == 1
            self._solve_module(mod, entry, targets[mod.full_name])
            if entry is not None:
                users[id(entry)] -= 1
                if users[id(entry)] == 0:  # its last module is solved: free its sums (a Hessian is in² floats)
                    entry.hessian = entry.sq_norm = entry.total = None

    def _solve_module(self, mod: PrunableModule, stats: InputStats | None, target: float) -> None:
        """Ask the method for ``mod``'s new weight, write it back and record what was done."""
        start = time.perf_counter()
        weight = mod.get_weight()
        frozen = self._frozen(mod, weight.device)
        # ``frozen`` only when there is one: a method written before schedules existed still prunes one-shot
        extra = {"frozen": frozen} if frozen is not None else {}
        result = self.method.prune(weight.clone(), stats, target, self.pattern, **extra)
        self._check_result(mod, weight, result)
        if frozen is not None and bool((result.mask & frozen).any() or result.weight[frozen].any()):
            raise RuntimeError(f"method {self.method.name} revived weights of {mod.full_name} pruned by an earlier step")
        mod.set_weight(result.weight.to(weight.dtype))
        sync(self.device)
        elapsed = time.perf_counter() - start
        self.timer.seconds["solve"] += elapsed
        asked = self.pattern.sparsity if self.pattern.is_nm else target
        self.records.append(
            # achieved: filled from the weights once the run is over (``measure_sparsity``)
            ModuleRecord(mod.full_name, mod.layer, mod.name, (mod.out_features, mod.in_features), asked, 0.0, elapsed)
        )
        if self.masks is not None:
            mask = result.mask.to(torch.bool)
            self.masks[f"{mod.full_name}.weight"] = (mask.t() if mod.transposed else mask).contiguous().cpu()

    def _frozen(self, mod: PrunableModule, device: torch.device) -> torch.Tensor | None:
        """``mod``'s entries pruned by an earlier step (True), laid out ``[out, in]``; None when none given."""
        keep = self.frozen.get(f"{mod.full_name}.weight")
        if keep is None:
            return None
        keep = keep.t() if mod.transposed else keep
        return ~keep.to(device=device, dtype=torch.bool)

    def _check_result(self, mod: PrunableModule, weight: torch.Tensor, result: PruneResult) -> None:
        if tuple(result.weight.shape) != tuple(weight.shape) or tuple(result.mask.shape) != tuple(weight.shape):
            raise RuntimeError(
                f"method {self.method.name} returned weight {tuple(result.weight.shape)} / mask "
                f"{tuple(result.mask.shape)} for {mod.full_name}, expected {tuple(weight.shape)}"
            )

    def _prune_all(self, calib_ids: torch.Tensor | None) -> list[float]:
        """Capture, allocate, prune every layer; return the per-layer targets."""
        if self.needs_data:
            self._calib_fingerprint = ids_fingerprint(calib_ids)
            self._calib_shape = list(calib_ids.shape)
            with self.timer("capture"):
                self.walk.capture(calib_ids.split(self.settings.batch_size))
        if self.streamed is not None:  # layer 0's inputs are captured: nothing reads the embeddings again
            self.streamed.release_outside()
        planned = alloc.layer_targets(self.allocation, self.sparsity, self.adapter.num_layers, self.score_pass)
        self.outlier_ratios = planned.outlier_ratios
        targets = alloc.module_targets(self.selected, planned.targets, self.sparsity, self.method.global_scope)
        entry = self._stats_entry()
        resumed: dict[int, dict] = {}
        if self.streamed is not None and self.streamed.writer is not None:  # after any pre-pass: it reads the source
            resumed = self.streamed.resume(self._stream_key(planned.targets), replay_written=self.settings.sequential)
        try:
            self.walk.run(lambda stop: self._visit(stop, targets, entry, resumed), desc=f"prune {self.method.name}",
                          final=True)
        except BaseException:
            if entry is not None:
                entry.discard()
            raise
        if entry is not None:
            entry.commit()
        return planned.targets

    def _visit(self, stop: LayerStop, targets: Mapping[str, float], entry: StatsEntry | None,
               resumed: Mapping[int, dict]) -> list[torch.Tensor] | None:
        if stop.index in resumed:
            return self._replay_layer(stop, resumed[stop.index])
        outputs = self._prune_layer(stop, targets, entry)
        if self.tally is not None:  # a streamed layer leaves memory after this visit: measure it now
            with self.timer("measure"):
                counts = [self.tally.add(mod) for mod in self.by_layer.get(stop.index, [])]
            if self.streamed is not None:  # recorded with the layer's shard, for a resumed run
                self.streamed.note(stop.index, {"tally": counts, "records": [
                    dataclasses.asdict(record) for record in self.records if record.layer == stop.index]})
        return outputs

    def _replay_layer(self, stop: LayerStop, noted: Mapping[str, Any]) -> list[torch.Tensor] | None:
        """A layer an interrupted run with the same key wrote: its counts and records back, and the next inputs."""
        for counts in noted["tally"]:
            self.tally.add_counts(**counts)
        self.records += [ModuleRecord(**{**record, "shape": tuple(record["shape"])}) for record in noted["records"]]
        if stop.last or stop.inputs is None:
            return None
        with self.timer("forward"):
            return self.walk.forward(stop)

    # ----------------------------------------------------------------------------- run
    def run(self, calib_ids: torch.Tensor | None) -> PruneReport:
        check_pattern_fits(self.model, self.pattern, self.settings.targets, self.settings.skip)
        if self.needs_data:
            _check_calibration(calib_ids, self.method)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                layer_targets = self._prune_all(calib_ids)
                if self.streamed is not None:
                    if self.tally is not None and self.tally.violations:  # before the index makes the output loadable
                        raise RuntimeError(f"N:M check failed after pruning: {self.tally.violations}")
                    with self.timer("stream"):
                        self.streamed_record = self.streamed.finish()
        finally:
            self.model.train(was_training)
        self.timer.seconds["total"] = time.perf_counter() - start
        return self._report(calib_ids, layer_targets)

    def _report(self, calib_ids: torch.Tensor | None, layer_targets: list[float]) -> PruneReport:
        if self.tally is not None and self.streamed is not None:
            summary = self.tally.summary(self.streamed.zeros, self.streamed.count)
        else:
            with self.timer("measure"):
                summary = measure_sparsity(self.model, self.settings.targets, self.settings.skip, self.pattern)
        for record in self.records:
            record.achieved = summary.per_module[record.name]
        return PruneReport(
            method=self.method.name,
            params=dict(self.method.params),
            pattern=str(self.pattern),
            sparsity=self.sparsity,
            allocation=alloc.describe(self.allocation, self.method.global_scope),
            sequential=self.settings.sequential,
            device=str(self.device),
            nsamples=int(calib_ids.shape[0]) if self.needs_data else 0,
            seqlen=int(calib_ids.shape[1]) if self.needs_data else 0,
            layer_targets=layer_targets,
            modules=self.records,
            summary=summary,
            timings=dict(self.timer.seconds),
            peak_memory_mb=self._peak_memory(),
            layer_forwards=self.layer_forwards,
            outlier_ratios=self.outlier_ratios,
            prepass_cache=self.prepass_record,
            stats_cache=self.stats_record,
            streamed=self.streamed_record,
            masks=self.masks,
        )

    def _peak_memory(self) -> dict[str, float]:
        peak = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if self.device.type == "cuda":
            peak["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak


def prune_model(
    model: nn.Module,
    method: PruningMethod,
    calib_ids: torch.Tensor | None,
    sparsity: float,
    pattern: Pattern | str = "unstructured",
    allocation: AllocationConfig | Mapping[str, Any] | None = None,
    engine: PruneEngineConfig | Mapping[str, Any] | None = None,
    frozen: Mapping[str, torch.Tensor] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time.

    Args:
        model: a causal LM of a supported architecture (``prunelab.models.adapters``).
        method: the pruning method (``prunelab.prune.methods.build_method``).
        calib_ids: calibration token ids ``[nsamples, seqlen]``; may be None for methods that
            need no statistics (magnitude, random).
        sparsity: run-level target in [0, 1) (N:M patterns fix it at N/M).
        pattern: ``unstructured`` or N:M.
        allocation: the ``allocation`` block (``AllocationConfig``, or a mapping of its fields:
            ``name``: uniform | owl | explicit, ``lam``, ``m``, ``layers``); None = uniform.
        engine: the ``prune`` block (``PruneEngineConfig``, or a mapping of its fields: ``sequential``,
            ``device``, ``targets``, ``skip``, ``batch_size``, ``save_masks``, ``share_stats``); None = defaults.
        frozen: keep-masks of an earlier pruning step (parameter name → bool, True = kept, in the
            parameter's layout as ``prunelab.io.masks`` stores them): what they prune stays pruned.
        cache_dir: where a pre-pass over the unpruned weights (OWL's outlier ratios, ``<cache_dir>/prepass``)
            and, for ``sequential=false``, the dense model's per-layer statistics (``<cache_dir>/stats``)
            are kept for the next job that would compute the same numbers; None: no cache.

    Returns:
        A :class:`PruneReport` with per-module targets and achieved sparsity, the sparsity
        measured on the weights afterwards, timings (seconds per phase) and peak memory.
    """
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    settings = EngineSettings.of(engine)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    pruner = LayerwisePruner(model, method, sparsity, pattern, alloc.settings(allocation), settings, frozen,
                             PrepassCache(cache / "prepass") if cache else None,
                             stats_cache=StatsCache(cache / "stats") if cache else None)
    report = pruner.run(calib_ids)
    log.info(
        "pruned %d Linear modules with %s (%s): %.2f%% of their weights are zero now (%.1f s)",
        len(report.modules), method.name, pattern, 100 * report.summary.overall, report.timings.get("total", 0.0),
    )
    return report


def prune_streamed(
    folder: str | os.PathLike | StreamedModel,
    out: str | os.PathLike,
    method: PruningMethod,
    calib_ids: torch.Tensor | None,
    sparsity: float,
    pattern: Pattern | str = "unstructured",
    allocation: AllocationConfig | Mapping[str, Any] | None = None,
    engine: PruneEngineConfig | Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> PruneReport:
    """Prune the checkpoint in ``folder`` into ``out`` without ever holding the whole model.

    The model is built on the meta device; each decoder layer is read (memory-mapped) from
    ``folder``'s safetensors when the walk reaches it, pruned like :func:`prune_model` does,
    measured, written as one shard of ``out`` and dropped (``prunelab.models.streaming``). Memory
    holds one layer, the calibration activations and the embeddings' touched rows. ``out`` gets
    the index, config and tokenizer files last: it loads with ``from_pretrained`` once complete,
    and a run that stops early leaves no index there.

    Args:
        folder: a model folder (config.json and safetensors, as ``save_pretrained`` writes it), or
            one already opened with ``prunelab.models.streaming.open_streamed`` (``dtype`` is then its own).
        out: the output folder; it must not hold a checkpoint yet.
        method, calib_ids, sparsity, pattern, allocation, engine: as for :func:`prune_model`
            (``engine.save_masks`` keeps every mask in memory: leave it off for a big model).
        dtype: the dtype layers are computed and written in.

    Returns:
        The :class:`PruneReport`; ``streamed`` says what was read and written and the most layers
        ever resident at once.
    """
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    settings = EngineSettings.of(engine)
    model = folder if isinstance(folder, StreamedModel) else open_streamed(folder, dtype)
    check_pattern_fits(model.model, pattern, settings.targets, settings.skip)  # before anything is written
    layers = StreamedLayers(model, out)
    pruner = LayerwisePruner(model.model, method, sparsity, pattern, alloc.settings(allocation), settings, streamed=layers)
    report = pruner.run(calib_ids)
    log.info(
        "pruned %s into %s layer by layer from disk with %s (%s): %.2f%% of the targeted weights are zero (%.1f s)",
        model.reader.folder, out, method.name, pattern, 100 * report.summary.overall, report.timings.get("total", 0.0),
    )
    return report


@torch.no_grad()
def layerwise_forward(
    model: nn.Module, calib_ids: torch.Tensor, engine: PruneEngineConfig | Mapping[str, Any] | None = None
) -> list[torch.Tensor]:
    """The dense model run layer by layer like the engine does (capture, then one layer at a time).

    Returns the last decoder layer's outputs per batch (before the final norm). The reference
    cost the pruning benchmark divides by, and a check that capture + replay equals the model.
    """
    settings = EngineSettings.of(engine)
    walk = LayerWalk(get_adapter(model), settings.compute_device)
    was_training = model.training
    model.eval()
    try:
        walk.capture(calib_ids.split(settings.batch_size))
        return walk.run(walk.forward, desc="dense layer-wise forward")
    finally:
        model.train(was_training)
