"""The layer-wise pruning driver: one decoder layer on the compute device at a time.

For each decoder layer, in order:

1. move it to ``prune.device``;
2. hook its targeted Linear/Conv1D modules and run the calibration windows through it
   (``prune.batch_size`` windows per forward), accumulating what the method ``needs``
   (``InputStats``);
3. ask the method for each module's new weight and write it back (dtype and layout kept);
4. ``prune.sequential``: run the pruned layer again, so the next layer calibrates on what the
   pruned model really feeds it; otherwise pass on the dense outputs of step 2;
5. move it back to where it was.

Layer 0's inputs and every layer's other arguments (masks, position embeddings) come from one
backbone forward with the layers replaced by recorders (``prunelab.prune.capture``). Methods that
need no statistics (magnitude, random) run without any forward pass.

Passes are not wasted: modules fed the same tensor (q/k/v, gate/up) share one ``InputStats``;
when step 2's outputs are thrown away (sequential mode, or the last layer, whose outputs nothing
reads) the layer's last Linear (``ArchSpec.last_linear``, e.g. ``mlp.down_proj``) only records
its input, since its product would only reach the discarded output; the last layer is never
re-run. A sequential run thus makes 2L - 1 layer passes over the calibration set (L with
statistics hooks, L - 1 re-runs of pruned layers); ``experiments/bench_prune.py`` measures it.
"""

from __future__ import annotations

import logging
import resource
import time
import types
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.models.adapters import DecoderAdapter, PrunableModule, get_adapter, select_modules
from prunelab.prune import allocation as alloc
from prunelab.progress import progress
from prunelab.prune.capture import CapturedInputs, LayerCall, capture_layer_inputs, run_layer
from prunelab.prune.methods.base import InputStats, PruningMethod
from prunelab.prune.pattern import Pattern
from prunelab.prune.summary import ModuleRecord, PruneReport, measure_sparsity

log = logging.getLogger(__name__)

ENGINE_KEYS = ("sequential", "device", "targets", "skip", "batch_size", "save_masks")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; raises when CUDA is asked for but missing."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"prune.device={device} but CUDA is not available; use prune.device=cpu or auto")
    return torch.device(device)


@dataclass
class EngineSettings:
    """The ``prune:`` block of the config (see ``conf/config.yaml``)."""

    sequential: bool = True
    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    targets: list[str] = field(default_factory=lambda: [".*"])
    skip: list[str] = field(default_factory=list)
    batch_size: int = 1
    save_masks: bool = False

    @classmethod
    def from_mapping(cls, engine: Mapping[str, Any] | None) -> "EngineSettings":
        engine = dict(engine or {})
        unknown = sorted(set(engine) - set(ENGINE_KEYS))
        if unknown:
            raise ValueError(f"prune.{unknown[0]} is not an engine setting; known: {', '.join(ENGINE_KEYS)}")
        batch_size = engine.get("batch_size", 1)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"prune.batch_size={batch_size!r} must be a positive integer")
        return cls(
            sequential=bool(engine.get("sequential", True)),
            device=resolve_device(engine.get("device", "auto")),
            targets=[str(t) for t in engine.get("targets", [".*"])],
            skip=[str(s) for s in engine.get("skip", [])],
            batch_size=batch_size,
            save_masks=bool(engine.get("save_masks", False)),
        )


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


class _StatsCollector:
    """Forward pre-hooks that accumulate ``InputStats`` for a layer's targeted modules.

    Modules that receive the very same, unmodified tensor (q/k/v, gate/up) share one
    ``InputStats``. The sharing is found on the first batch by object identity plus the tensor's
    in-place version counter (the tensors are held for the batch, so a freed address cannot be
    reused to fake identity) and re-checked on every later batch.
    """

    def __init__(self, modules: Sequence[PrunableModule], needs: frozenset[str], device: torch.device):
        self.needs = needs
        self.device = device
        self.stats: dict[str, InputStats] = {}
        self.shared_with: dict[str, str] = {}
        self._modules = {m.name: m for m in modules}
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}  # this batch: module → (input, its version)
        self._first_batch = True
        self._handles = [m.module.register_forward_pre_hook(self._hook(m.name)) for m in modules]

    def _same_input(self, owner: str, x: torch.Tensor) -> bool:
        seen = self._seen.get(owner)
        return seen is not None and seen[0] is x and seen[1] == x._version

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            owner = self.shared_with.get(name)
            if self._first_batch:
                owner = next((other for other in self._seen if self._same_input(other, x)), None)
                if owner is not None:
                    self.shared_with[name] = owner
                    self.stats[name] = self.stats[owner]
                    return
                self.stats[name] = InputStats(self._modules[name].in_features, self.needs, self.device)
            elif owner is not None:
                if not self._same_input(owner, x):
                    raise RuntimeError(f"{name} stopped receiving the same input as {owner}; cannot share statistics")
                return
            self.stats[name].add(x)
            self._seen[name] = (x, x._version)

        return hook

    def end_batch(self) -> None:
        self._first_batch = False
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()
        for name, module in self._modules.items():
            if name not in self.stats:
                log.warning("%s never ran during calibration; its statistics are empty", module.full_name)
                self.stats[name] = InputStats(module.in_features, self.needs, self.device)


@contextmanager
def _input_only(module: PrunableModule | None) -> Iterator[None]:
    """Make ``module`` return zeros of its output shape (its pre-hooks still see the input)."""
    if module is None:
        yield
        return
    out_features = module.out_features

    def forward(_self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    module.module.forward = types.MethodType(forward, module.module)
    try:
        yield
    finally:
        del module.module.forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[key] += time.perf_counter() - start


def _home(layer: nn.Module) -> torch.device:
    return next(iter(layer.parameters())).device


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
        allocation: Mapping[str, Any],
        settings: EngineSettings,
    ):
        self.model = model
        self.method = method
        self.pattern = pattern
        self.sparsity = pattern.sparsity if pattern.is_nm else alloc.check_sparsity(sparsity)
        self.allocation = dict(allocation)
        self.settings = settings
        self.device = settings.device
        self.adapter: DecoderAdapter = get_adapter(model)
        self.selected = select_modules(model, settings.targets, settings.skip)
        self.by_layer: dict[int, list[PrunableModule]] = defaultdict(list)
        for m in self.selected:
            self.by_layer[m.layer].append(m)
        self.timer = _Timer(self.device)
        self.layer_forwards = 0
        self.records: list[ModuleRecord] = []
        self.masks: dict[str, torch.Tensor] | None = {} if settings.save_masks else None
        self.outlier_ratios: list[float | None] | None = None
        self._check_allocation()

    # ----------------------------------------------------------------------------- allocation
    def _check_allocation(self) -> None:
        name = self.allocation.get("name", "uniform")
        if name not in ("uniform", "owl", "explicit"):
            raise ValueError(f"allocation={name!r} is not known; use uniform, owl or explicit")
        if self.pattern.is_nm and (name != "uniform" or self.global_scope):
            what = f"allocation={name}" if name != "uniform" else "method.params.scope=global"
            raise ValueError(f"{what} needs pattern=unstructured (N:M fixes every layer's sparsity)")

    @property
    def global_scope(self) -> bool:
        return self.method.name == "magnitude" and self.method.params.get("scope") == "global"

    @property
    def needs_data(self) -> bool:
        return bool(self.method.needs)

    def layer_targets(self, captured: CapturedInputs | None) -> list[float]:
        num_layers = self.adapter.num_layers
        name = self.allocation.get("name", "uniform")
        if name == "explicit":
            return alloc.explicit(self.allocation.get("layers") or {}, num_layers, self.sparsity)
        if name == "owl":
            self.outlier_ratios = self._owl_ratios(captured)
            pruned = [i for i, r in enumerate(self.outlier_ratios) if r is not None]  # layers with targets
            lam = float(self.allocation.get("lam", 0.08))
            spread = alloc.owl([self.outlier_ratios[i] for i in pruned], self.sparsity, lam)
            targets = [self.sparsity] * num_layers
            for i, target in zip(pruned, spread):
                targets[i] = target
            return targets
        return alloc.uniform(num_layers, self.sparsity)

    def module_targets(self, layer_targets: list[float]) -> dict[str, float]:
        if self.global_scope:
            weights = {m.full_name: m.get_weight() for m in self.selected}
            return alloc.global_magnitude(weights, self.sparsity)
        return {m.full_name: layer_targets[m.layer] for m in self.selected}

    def _owl_ratios(self, captured: CapturedInputs | None) -> list[float | None]:
        """OWL's pre-pass: outlier ratio of every layer's scores on the dense model (None: nothing targeted)."""
        m = float(self.allocation.get("m", 5.0))
        ratios = []
        hidden = captured.hidden if captured is not None else None
        for index in progress(range(self.adapter.num_layers), desc="OWL outlier pre-pass", unit="layer"):
            layer = self.adapter.layers[index]
            home = _home(layer)
            with self.timer("move"):
                layer.to(self.device)
            modules = self.by_layer.get(index, [])
            stats: Mapping[str, InputStats | None] = {}
            if hidden is not None:
                last = index == self.adapter.num_layers - 1
                collector = _StatsCollector(modules, self.method.outlier_needs, self.device)
                with self.timer("owl_prepass"), _input_only(self._last_linear(modules, index) if last else None):
                    hidden = self._forward(layer, hidden, captured.calls[index], collector, keep_outputs=not last)
                collector.remove()
                stats = collector.stats
            with self.timer("owl_prepass"):
                scores = [self.method.outlier_scores(mod.get_weight(), stats.get(mod.name)) for mod in modules]
                ratios.append(alloc.outlier_ratio(scores, m) if scores else None)
            with self.timer("move"):
                layer.to(home)
        log.info("OWL outlier ratios (m=%g): %s", m, ", ".join("-" if r is None else f"{r:.4f}" for r in ratios))
        return ratios

    # ----------------------------------------------------------------------------- passes
    def _forward(
        self,
        layer: nn.Module,
        hidden: list[torch.Tensor],
        calls: list[LayerCall],
        collector: _StatsCollector | None = None,
        keep_outputs: bool = True,
    ) -> list[torch.Tensor]:
        outputs = []
        for batch, call in zip(hidden, calls):
            out = run_layer(layer, batch, call)
            if keep_outputs:
                outputs.append(out)
            if collector is not None:
                collector.end_batch()
        self.layer_forwards += 1
        return outputs

    def _solve(self, modules: Sequence[PrunableModule], stats: Mapping[str, InputStats], targets: Mapping[str, float]) -> None:
        for mod in modules:
            start = time.perf_counter()
            weight = mod.get_weight()
            result = self.method.prune(weight.clone(), stats.get(mod.name), targets[mod.full_name], self.pattern)
            if tuple(result.weight.shape) != tuple(weight.shape) or tuple(result.mask.shape) != tuple(weight.shape):
                raise RuntimeError(
                    f"method {self.method.name} returned weight {tuple(result.weight.shape)} / mask "
                    f"{tuple(result.mask.shape)} for {mod.full_name}, expected {tuple(weight.shape)}"
                )
            mod.set_weight(result.weight.to(weight.dtype))
            _sync(self.device)
            elapsed = time.perf_counter() - start
            self.timer.seconds["solve"] += elapsed
            target = self.pattern.sparsity if self.pattern.is_nm else targets[mod.full_name]
            self.records.append(
                # achieved: filled from the weights once the run is over (``measure_sparsity``)
                ModuleRecord(mod.full_name, mod.layer, mod.name, (mod.out_features, mod.in_features), target, 0.0, elapsed)
            )
            if self.masks is not None:
                mask = result.mask.to(torch.bool)
                self.masks[f"{mod.full_name}.weight"] = (mask.t() if mod.transposed else mask).contiguous().cpu()

    def _last_linear(self, modules: Sequence[PrunableModule], index: int) -> PrunableModule | None:
        name = self.adapter.spec.last_linear
        if name is None:
            return None
        found = next((m for m in modules if m.name == name), None)
        if found is not None:
            return found
        try:
            module = self.adapter.layers[index].get_submodule(name)
        except AttributeError:
            return None
        return PrunableModule(index, name, f"{self.adapter.layers_path}.{index}.{name}", module)

    def prune_layer(
        self, index: int, hidden: list[torch.Tensor] | None, calls: list[LayerCall] | None, targets: Mapping[str, float]
    ) -> list[torch.Tensor] | None:
        """Prune decoder layer ``index`` and return the next layer's inputs.

        None when no statistics are needed (no forward at all) and for the last layer, whose
        outputs nothing reads.
        """
        layer = self.adapter.layers[index]
        modules = self.by_layer.get(index, [])
        need_outputs = index < self.adapter.num_layers - 1
        home = _home(layer)
        with self.timer("move"):
            layer.to(self.device)
        try:
            if hidden is None:  # no statistics needed: no forward at all
                self._solve(modules, {}, targets)
                return None
            if not modules:
                if not need_outputs:
                    return None
                with self.timer("forward"):
                    return self._forward(layer, hidden, calls)
            # The statistics pass's outputs are thrown away when the pruned layer is re-run
            # (sequential) or when nothing reads them (last layer): skip the last Linear's product.
            discard = self.settings.sequential or not need_outputs
            collector = _StatsCollector(modules, self.method.needs, self.device)
            try:
                with self.timer("stats"), _input_only(self._last_linear(modules, index) if discard else None):
                    outputs = self._forward(layer, hidden, calls, collector, keep_outputs=not discard)
            finally:
                collector.remove()
            self._solve(modules, collector.stats, targets)
            del collector
            if not need_outputs:
                return None
            if self.settings.sequential:
                with self.timer("forward"):
                    outputs = self._forward(layer, hidden, calls)
            return outputs
        finally:
            with self.timer("move"):
                layer.to(home)

    # ----------------------------------------------------------------------------- run
    def run(self, calib_ids: torch.Tensor | None) -> PruneReport:
        check_pattern_fits(self.model, self.pattern, self.settings.targets, self.settings.skip)
        if self.needs_data:
            _check_calibration(calib_ids, self.method)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                captured = None
                if self.needs_data:
                    batches = calib_ids.split(self.settings.batch_size)
                    with self.timer("capture"):
                        captured = capture_layer_inputs(self.adapter, batches, self.device)
                layer_targets = self.layer_targets(captured)
                targets = self.module_targets(layer_targets)
                hidden = captured.hidden if captured is not None else None
                if captured is not None:
                    captured.hidden = []  # the loop below owns (and replaces) the layer inputs
                desc = f"prune {self.method.name}"
                for index in progress(range(self.adapter.num_layers), desc=desc, unit="layer"):
                    calls = captured.calls[index] if captured is not None else None
                    hidden = self.prune_layer(index, hidden, calls, targets)
                del hidden, captured
        finally:
            self.model.train(was_training)
        self.timer.seconds["total"] = time.perf_counter() - start
        with self.timer("measure"):
            summary = measure_sparsity(self.model, self.settings.targets, self.settings.skip, self.pattern)
        for record in self.records:
            record.achieved = summary.per_module[record.name]
        peak = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if cuda:
            peak["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return PruneReport(
            method=self.method.name,
            params=dict(self.method.params),
            pattern=str(self.pattern),
            sparsity=self.sparsity,
            allocation=str(self.allocation.get("name", "uniform")) + (" (global magnitude)" if self.global_scope else ""),
            sequential=self.settings.sequential,
            device=str(self.device),
            nsamples=int(calib_ids.shape[0]) if self.needs_data else 0,
            seqlen=int(calib_ids.shape[1]) if self.needs_data else 0,
            layer_targets=layer_targets,
            modules=self.records,
            summary=summary,
            timings=dict(self.timer.seconds),
            peak_memory_mb=peak,
            layer_forwards=self.layer_forwards,
            outlier_ratios=self.outlier_ratios,
            masks=self.masks,
        )


def prune_model(
    model: nn.Module,
    method: PruningMethod,
    calib_ids: torch.Tensor | None,
    sparsity: float,
    pattern: Pattern | str = "unstructured",
    allocation: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time.

    Args:
        model: a causal LM of a supported architecture (``prunelab.models.adapters``).
        method: the pruning method (``prunelab.prune.methods.build_method``).
        calib_ids: calibration token ids ``[nsamples, seqlen]``; may be None for methods that
            need no statistics (magnitude, random).
        sparsity: run-level target in [0, 1) (N:M patterns fix it at N/M).
        pattern: ``unstructured`` or N:M.
        allocation: the ``allocation`` config (``name``: uniform | owl | explicit, ``lam``, ``m``,
            ``layers``); None = uniform.
        engine: the ``prune`` config block (``sequential``, ``device``, ``targets``, ``skip``,
            ``batch_size``, ``save_masks``); None = defaults.

    Returns:
        A :class:`PruneReport` with per-module targets and achieved sparsity, the sparsity
        measured on the weights afterwards, timings (seconds per phase) and peak memory.
    """
    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern
    settings = EngineSettings.from_mapping(engine)
    pruner = LayerwisePruner(model, method, sparsity, pattern, allocation or {"name": "uniform"}, settings)
    report = pruner.run(calib_ids)
    log.info(
        "pruned %d Linear modules with %s (%s): %.2f%% of their weights are zero now (%.1f s)",
        len(report.modules), method.name, pattern, 100 * report.summary.overall, report.timings.get("total", 0.0),
    )
    return report


@torch.no_grad()
def layerwise_forward(
    model: nn.Module, calib_ids: torch.Tensor, engine: Mapping[str, Any] | None = None
) -> list[torch.Tensor]:
    """The dense model run layer by layer like the engine does (capture, then one layer at a time).

    Returns the last decoder layer's outputs per batch (before the final norm). The reference
    cost the pruning benchmark divides by, and a check that capture + replay equals the model.
    """
    settings = EngineSettings.from_mapping(engine)
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    try:
        captured = capture_layer_inputs(adapter, calib_ids.split(settings.batch_size), settings.device)
        hidden = captured.hidden
        captured.hidden = []
        for index in progress(range(adapter.num_layers), desc="dense layer-wise forward", unit="layer"):
            layer = adapter.layers[index]
            home = _home(layer)
            layer.to(settings.device)
            hidden = [run_layer(layer, batch, call) for batch, call in zip(hidden, captured.calls[index])]
            layer.to(home)
    finally:
        model.train(was_training)
    return hidden
