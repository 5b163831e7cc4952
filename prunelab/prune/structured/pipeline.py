"""Structured pruning of a model: score the units, choose the ones to remove, remove them for real.

One pass of the layer conveyor over the calibration windows collects what the scores need from the
dense model (the input statistics of each layer's output projection: o_proj for heads, down_proj /
c_proj / fc2 for neurons; or the layer-to-layer cosines for layers). Taylor scores take gradients of
the causal-LM loss instead (a backward pass of the whole model per calibration window). Then
:mod:`prunelab.prune.structured.select` picks the units and :mod:`prunelab.models.surgery` removes
them; with FLAP the removed channels' mean contribution is added to the output projection's bias.

``allocation=global`` makes the layers' widths adaptive the way FLAP does (its AL-MM structure):
each layer's scores are standardised over that layer (FLAP's WIFV per channel, then a head's mean
over its channels; the other scores per unit), and one threshold over all layers takes the lowest.
``heads_neurons`` ranks heads and neurons together (FLAP's AL-AM), each weighted by the parameters
it owns, until the removed parameters reach ``fraction`` of all heads' and neurons' parameters. With
grouped-query attention the units ranked over layers are what surgery can remove: one query head
from every KV group of a layer at a time (``heads=per_group``: the weakest remaining head of each
group, scored by their mean) or whole KV groups (``heads=groups``, with their k/v rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunelab.models import surgery
from prunelab.models.adapters import PrunableModule, get_adapter
from prunelab.progress import progress
from prunelab.prune.stats import SQ_NORM, SUM, InputStats, collect_stats
from prunelab.prune.structured import flap, magnitude, select, taylor, wanda_sp
from prunelab.prune.structured.collect import layer_scores
from prunelab.prune.walk import LayerStop, LayerWalk

log = logging.getLogger(__name__)

UNIT_SCORES = ("magnitude", "wanda", "flap", "taylor")  # heads and neurons
LAYER_SCORES = ("block_influence", "angular", "last")  # layers
UNITS = ("neurons", "heads", "heads_neurons")  # what plan_structure removes (layers: plan_layers)
ALLOCATIONS = ("uniform", "global")


def kinds(unit: str) -> tuple[str, ...]:
    """The module kinds a structure removes: ``heads_neurons`` is both."""
    if unit not in UNITS:
        raise ValueError(f"structured units are {', '.join(UNITS)}, not {unit!r}")
    return ("heads", "neurons") if unit == "heads_neurons" else (unit,)


@dataclass
class StructuredPlan:
    """What goes: per layer the unit indices (heads, neurons), or the layer indices (layers).

    ``heads_neurons`` holds one plan per kind in ``parts``; its ``removed`` and ``scores`` map each kind to
    that part's lists."""

    unit: str
    score: str
    removed: list[list[int]] | list[int] | dict[str, list[list[int]]]
    scores: list[list[float]] | list[float] | dict[str, list[list[float]]]
    compensation: dict[int, torch.Tensor] = field(default_factory=dict)  # FLAP: layer -> bias to add
    parts: list[StructuredPlan] = field(default_factory=list)

    @classmethod
    def combined(cls, unit: str, score: str, parts: list[StructuredPlan]) -> StructuredPlan:
        return cls(unit, score, {p.unit: p.removed for p in parts}, {p.unit: p.scores for p in parts}, parts=parts)


def _weight(module: nn.Module) -> torch.Tensor:
    """``[out, in]`` whatever the module stores."""
    return PrunableModule(0, "", "", module).get_weight()


def _projections(model: nn.Module, layer: int, unit: str) -> tuple[list[tuple[nn.Module, slice]], nn.Module, int]:
    """(the modules whose output rows the units own, each with the slice of its rows that belongs to the
    units; the output projection whose input columns they own; channels per unit)."""
    spec = surgery.unit_spec(model)
    block = get_adapter(model).layers[layer]
    get = block.get_submodule
    everything = slice(None)
    if unit == "neurons":
        return [(get(name), everything) for name in spec.mlp_in], get(spec.mlp_out), 1
    heads, kv_heads, head_dim = surgery.attention_shape(model, layer)
    if spec.qkv is not None:  # GPT-2: one projection whose rows are q | k | v, one k and v head per head
        fused, width = get(spec.qkv), heads * head_dim
        return [(fused, slice(i * width, (i + 1) * width)) for i in range(3)], get(spec.o), head_dim
    # without GQA a head takes its own k and v rows with it: they count in its score (LLM-Pruner's group)
    rows = [get(spec.q)] + ([get(spec.k), get(spec.v)] if heads == kv_heads else [])
    return [(m, everything) for m in rows], get(spec.o), head_dim


@torch.no_grad()
def channel_stats(model: nn.Module, calib_ids: torch.Tensor, unit: str, device: torch.device | str = "cpu",
                  batch_size: int = 1) -> list[InputStats]:
    """Per layer, Σx, Σx² and the token count of the output projection's inputs (dense model)."""
    return output_stats(model, calib_ids, (unit,), device, batch_size)[unit]


@torch.no_grad()
def output_stats(model: nn.Module, calib_ids: torch.Tensor, unit_kinds: tuple[str, ...],
                 device: torch.device | str = "cpu", batch_size: int = 1) -> dict[str, list[InputStats]]:
    """:func:`channel_stats` of each kind in ``unit_kinds`` (heads: o_proj, neurons: down_proj) in one pass."""
    adapter = get_adapter(model)
    walk = LayerWalk(adapter, torch.device(device))
    walk.capture(list(calib_ids.split(batch_size)))
    out: dict[str, list[InputStats]] = {kind: [] for kind in unit_kinds}

    def visit(stop: LayerStop) -> list[torch.Tensor]:
        modules = [PrunableModule(stop.index, kind, kind, _projections(model, stop.index, kind)[1])
                   for kind in unit_kinds]
        with collect_stats(modules, frozenset({SQ_NORM, SUM}), torch.device("cpu")) as collector:
            outputs = walk.forward(stop, observer=collector)
        for kind in unit_kinds:
            out[kind].append(collector.stats[kind])
        return outputs

    was_training = model.training
    model.eval()
    try:
        walk.run(visit, desc=f"{' and '.join(unit_kinds)} statistics")
    finally:
        model.train(was_training)
    return out


def taylor_gradients(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Σ over calibration windows of ∂(causal-LM loss)/∂W for every parameter (a backward per batch)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    scored = {f"{m.full_name}.weight" for m in get_adapter(model).iter_prunable()}
    sums: dict[str, torch.Tensor] = {}
    try:
        batches = calib_ids.split(batch_size)
        for batch in progress(batches, desc="taylor gradients", unit="batch", total=len(batches)):
            batch = batch.to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            for name, param in model.named_parameters():  # only the layers' weights, summed in float32
                if name in scored and param.grad is not None:
                    grad = param.grad.detach().float()
                    sums[name] = sums[name].add_(grad) if name in sums else grad.clone()
            model.zero_grad(set_to_none=True)
        return sums
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def unit_scores(model: nn.Module, unit: str, score: str, stats: list[InputStats] | None = None,
                grads: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One score per head or neuron, per layer (higher = keep)."""
    if score not in UNIT_SCORES:
        raise ValueError(f"{unit} are scored by {', '.join(UNIT_SCORES)}, not {score!r}")
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in range(get_adapter(model).num_layers):
        rows, output_proj, width = _projections(model, layer, unit)
        if score == "magnitude":
            out.append(magnitude.unit_scores([_weight(m)[part] for m, part in rows], [_weight(output_proj)], width))
        elif score in ("wanda", "flap"):
            if stats is None:
                raise ValueError(f"{score} scores need the calibration statistics (channel_stats)")
            s = stats[layer]
            if score == "wanda":
                out.append(wanda_sp.unit_scores(_weight(output_proj), s.sq_norm, width))
            else:
                _, variance = flap.channel_moments(s.total, s.sq_norm, s.ntokens)
                out.append(flap.unit_scores(_weight(output_proj), variance, width, unit))
        else:
            if grads is None:
                raise ValueError("taylor scores need gradients (taylor_gradients)")

            def pair(module: nn.Module, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
                grad = grads[names[id(module)] + ".weight"]  # the parameter's layout: Conv1D's is [in, out]
                grad = grad.t() if isinstance(module, Conv1D) else grad
                return _weight(module)[part], grad[part]

            out.append(taylor.unit_scores([pair(m, part) for m, part in rows], [pair(output_proj)], width))
    return out


def plan_structure(model: nn.Module, unit: str, score: str, fraction: float, calibration: Callable[[], torch.Tensor],
                   allocation: str = "uniform", protect: Iterable[int] = (), heads: str = "per_group",
                   device: torch.device | str = "cpu", batch_size: int = 1) -> StructuredPlan:
    """Score the heads and/or neurons ``unit`` names with what ``score`` needs (``calibration()`` gives the
    windows: input statistics in one pass for wanda / flap, gradients for taylor) and choose what goes."""
    unit_kinds = kinds(unit)
    stats: dict[str, list[InputStats]] = {}
    grads = None
    if score in ("wanda", "flap"):
        stats = output_stats(model, calibration(), unit_kinds, device, batch_size)
    elif score == "taylor":
        grads = taylor_gradients(model, calibration(), batch_size)
    scores = {kind: unit_scores(model, kind, score, stats=stats.get(kind), grads=grads) for kind in unit_kinds}
    del grads
    if len(unit_kinds) == 1:
        return plan_units(model, unit, score, fraction, scores[unit], allocation, protect, stats.get(unit), heads)
    return plan_heads_neurons(model, score, fraction, scores, allocation, protect, stats or None, heads)


def plan_units(model: nn.Module, unit: str, score: str, fraction: float, scores: list[torch.Tensor],
               allocation: str = "uniform", protect: Iterable[int] = (), stats: list[InputStats] | None = None,
               heads: str = "per_group") -> StructuredPlan:
    """Choose the heads or neurons to remove from their ``scores``.

    ``allocation``: ``uniform`` (the same count in every layer not protected) or ``global`` (FLAP's
    AL-MM: each layer's scores standardised, :func:`ranking_scores`, then the lowest ``fraction`` of all
    the kind's units over the layers go, every layer keeping one). Heads of GQA models: ``per_group``
    removes the same number of query heads from every KV group, ``groups`` whole KV groups.
    """
    check_plan(model, unit, fraction, allocation, protect, heads)
    if allocation == "global":
        ranked = [_rankable(model, unit, layer, s, heads) for layer, s in
                  enumerate(ranking_scores(model, unit, score, scores, stats))]
        chosen = select.global_ranking([r.scores for r in ranked], fraction, protect)
        removed = [r.units_of(picked) for r, picked in zip(ranked, chosen)]
    elif unit == "heads" and _gqa(model):
        removed = []
        protected = set(protect)
        for layer, head_scores in enumerate(scores):
            n_heads, n_kv, _ = surgery.attention_shape(model, layer)
            if layer in protected:
                removed.append([])
            elif heads == "groups":
                removed.append(select.whole_groups(head_scores, n_kv, int(round(n_kv * fraction))))
            else:
                removed.append(select.heads_in_groups(head_scores, n_kv, int(round(n_heads // n_kv * fraction))))
    else:
        removed = select.uniform(scores, fraction, protect)
    return _with_compensation(model, StructuredPlan(unit, score, removed, [s.tolist() for s in scores]), stats)


def plan_heads_neurons(model: nn.Module, score: str, fraction: float, scores: dict[str, list[torch.Tensor]],
                       allocation: str = "uniform", protect: Iterable[int] = (),
                       stats: dict[str, list[InputStats]] | None = None, heads: str = "per_group") -> StructuredPlan:
    """Heads and neurons together. ``uniform``: each kind loses ``fraction`` of its units in every layer
    (FLAP's UL-UM). ``global``: FLAP's AL-AM, both kinds standardised per layer and ranked in one list,
    each unit weighted by its parameters, until ``fraction`` of all heads' and neurons' parameters go."""
    check_plan(model, "heads_neurons", fraction, allocation, protect, heads)
    stats = stats or {}
    if allocation != "global":
        return StructuredPlan.combined("heads_neurons", score, [
            plan_units(model, kind, score, fraction, scores[kind], allocation, protect, stats.get(kind), heads)
            for kind in kinds("heads_neurons")])
    ranked = {kind: [_rankable(model, kind, layer, s, heads) for layer, s in
                     enumerate(ranking_scores(model, kind, score, scores[kind], stats.get(kind)))]
              for kind in kinds("heads_neurons")}
    order = list(ranked)
    chosen = select.global_budget([[r.scores for r in ranked[kind]] for kind in order],
                                  [[r.cost for r in ranked[kind]] for kind in order], fraction, protect)
    parts = []
    for kind, picked in zip(order, chosen):
        removed = [r.units_of(units) for r, units in zip(ranked[kind], picked)]
        plan = StructuredPlan(kind, score, removed, [s.tolist() for s in scores[kind]])
        parts.append(_with_compensation(model, plan, stats.get(kind)))
    return StructuredPlan.combined("heads_neurons", score, parts)


def ranking_scores(model: nn.Module, unit: str, score: str, scores: list[torch.Tensor],
                   stats: list[InputStats] | None = None) -> list[torch.Tensor]:
    """Per layer, scores comparable across layers (and across heads and neurons): FLAP's per-layer
    standardisation. For ``flap`` that of the channel metric (squared for heads), then a head's mean
    over its channels, as the authors' ``prune_flap`` does; for the other scores that of the unit scores
    (raw scores grow with depth, so a raw ranking over layers would empty the first layers)."""
    if score != "flap":
        return [select.standardize(s) for s in scores]
    if stats is None:
        raise ValueError("flap scores need the calibration statistics (channel_stats)")
    out = []
    for layer, s in enumerate(stats):
        _, output_proj, width = _projections(model, layer, unit)
        _, variance = flap.channel_moments(s.total, s.sq_norm, s.ntokens)
        out.append(select.standardize(flap.unit_channel_scores(_weight(output_proj), variance, unit), width))
    return out


@dataclass
class _Rankable:
    """What a layer offers a ranking over layers: ``scores`` of the units surgery can remove one by one,
    the parameters ``cost`` of each, and how a chosen set of them maps to heads / neurons."""

    scores: torch.Tensor
    cost: float
    units_of: Callable[[list[int]], list[int]]


def _rankable(model: nn.Module, unit: str, layer: int, values: torch.Tensor, heads: str) -> _Rankable:
    """Neurons and heads without GQA rank as they are. With GQA a layer offers whole KV groups (``groups``,
    scored by their heads' mean) or slices (``per_group``): slice r is the r-th weakest query head of every
    group, scored by their mean, so taking the first k slices of a layer takes k heads from each group."""
    cost = _unit_params(model, layer, unit)
    if unit != "heads" or not _gqa(model):
        return _Rankable(values, cost, list)
    n_heads, n_kv, head_dim = surgery.attention_shape(model, layer)
    size = n_heads // n_kv
    by_group = values.float().reshape(n_kv, size)
    if heads == "groups":
        group_cost = size * cost + _kv_params(model, layer, head_dim)
        return _Rankable(by_group.mean(dim=1), group_cost,
                         lambda groups: sorted(g * size + i for g in groups for i in range(size)))
    slices = by_group.sort(dim=1, stable=True).values.mean(dim=0)
    return _Rankable(slices, n_kv * cost, lambda picked: select.heads_in_groups(values, n_kv, len(picked)))


def _row_params(module: nn.Module) -> int:
    """Parameters of one output row of ``module`` (its input width, plus one for a bias)."""
    weight = _weight(module)
    return weight.shape[1] + (1 if getattr(module, "bias", None) is not None else 0)


def _unit_params(model: nn.Module, layer: int, unit: str) -> int:
    """Parameters one head (its q rows, without GQA its k and v rows too, and its o columns) or one
    neuron (its gate / up rows and down column) owns in ``layer``."""
    rows, output_proj, width = _projections(model, layer, unit)
    return width * (sum(_row_params(module) for module, _ in rows) + _weight(output_proj).shape[0])


def _kv_params(model: nn.Module, layer: int, head_dim: int) -> int:
    """Parameters of one KV head (its k and v rows), which a whole KV group takes with it."""
    spec = surgery.unit_spec(model)
    get = get_adapter(model).layers[layer].get_submodule
    return head_dim * (_row_params(get(spec.k)) + _row_params(get(spec.v)))


def _with_compensation(model: nn.Module, plan: StructuredPlan, stats: list[InputStats] | None) -> StructuredPlan:
    """FLAP: the bias that keeps each layer's mean output, for the channels its removed units own."""
    if plan.score != "flap" or stats is None:
        return plan
    for layer, units in enumerate(plan.removed):
        if units:
            _, output_proj, width = _projections(model, layer, plan.unit)
            mean, _ = flap.channel_moments(stats[layer].total, stats[layer].sq_norm, stats[layer].ntokens)
            channels = torch.tensor([u * width + j for u in units for j in range(width)])
            plan.compensation[layer] = flap.bias_compensation(_weight(output_proj), mean, channels)
    return plan


def _gqa(model: nn.Module) -> bool:
    heads, kv_heads, _ = surgery.attention_shape(model, 0)
    return surgery.unit_spec(model).grouped and kv_heads < heads


def check_plan(model: nn.Module, unit: str, fraction: float, allocation: str = "uniform", protect: Iterable[int] = (),
               heads: str = "per_group") -> None:
    """Refuse, before any statistics are gathered, a plan that cannot work on this model or removes nothing."""
    surgery.unit_spec(model)  # an unsupported family stops here
    if allocation not in ALLOCATIONS:
        raise ValueError(f"structure.allocation must be {' or '.join(ALLOCATIONS)}, not {allocation!r}")
    if unit == "layers":
        return
    layers = get_adapter(model).num_layers
    open_layers = layers - len(set(protect) & set(range(layers)))
    if open_layers == 0:
        raise ValueError("structure.protect names every layer: nothing would be removed")
    for kind in kinds(unit):
        _check_kind(model, kind, fraction, allocation, heads, open_layers, counted=unit != "heads_neurons")


def _check_kind(model: nn.Module, unit: str, fraction: float, allocation: str, heads: str, open_layers: int,
                counted: bool) -> None:
    """One kind: uniform removes round(fraction × units) of every layer's units, global round(fraction × all
    units) over the layers (``counted``; heads_neurons' global budget is in parameters), each layer keeping one."""
    layers = get_adapter(model).num_layers
    n_heads, n_kv, _ = surgery.attention_shape(model, 0)
    if unit == "heads" and heads == "groups" and n_kv == 1:
        raise ValueError("the model has one KV head: structure.heads=groups would remove all heads")
    if unit == "heads" and _gqa(model):
        whole = n_kv if heads == "groups" else n_heads // n_kv
        what = "KV groups" if heads == "groups" else "query heads of each KV group"
    elif unit == "heads":
        whole, what = n_heads, "heads per layer"
    else:
        whole, what = surgery.mlp_width(model, 0), "neurons per layer"
    if allocation == "global":
        if not counted:
            return
        count, most = round(layers * whole * fraction), open_layers * (whole - 1)
        if not 0 < count <= most:
            raise ValueError(f"structure.fraction={fraction} removes {count} of the {layers} layers x {whole} {what}; "
                             f"choose a fraction that removes between 1 and {most} (every layer keeps one)")
        return
    count = round(whole * fraction)
    if count == 0 and not (unit == "heads" and _gqa(model)):
        raise ValueError(f"structure.fraction={fraction} of {whole} {what} rounds to none; choose a larger fraction")
    if not 0 < count < whole:
        raise ValueError(f"structure.fraction={fraction} removes {count} of the {whole} {what}; choose a "
                         f"fraction that removes between 1 and {whole - 1}")


def plan_layers(model: nn.Module, score: str, count: int, calib_ids: torch.Tensor | None = None,
                device: torch.device | str = "cpu") -> StructuredPlan:
    """Choose ``count`` decoder layers: lowest Block Influence, the block of ``count`` consecutive layers
    with the smallest angular distance, or simply the ``last`` ones before the final layer."""
    layers = get_adapter(model).num_layers
    if not 0 < count < layers:
        raise ValueError(f"remove between 1 and {layers - 1} of the {layers} layers, not {count}")
    if score == "last":  # the last layers but the final one (ShortGPT's and SLEB's baseline)
        return StructuredPlan("layers", score, list(range(layers - 1 - count, layers - 1)), [])
    if score not in LAYER_SCORES or calib_ids is None:
        raise ValueError(f"layers are scored by {', '.join(LAYER_SCORES)} (all but 'last' need calibration)")
    measured = layer_scores(model, calib_ids, device, block=count if score == "angular" else 1)
    if score == "block_influence":
        values = measured["block_influence"]
        removed = sorted(sorted(range(layers), key=values.__getitem__)[:count])
    else:
        values = measured["angular_distance"]
        start = min(range(len(values)), key=values.__getitem__)
        removed = list(range(start, start + count))
    return StructuredPlan("layers", score, removed, values)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: StructuredPlan) -> bool:
    """Remove what ``plan`` names (FLAP biases added first) and sync the config.

    Returns True when the result is a standard config of its family: uniform widths, and no bias
    added to a projection the family builds without one (FLAP on Llama: prunelab's loader then).
    """
    if plan.unit == "layers":
        surgery.remove_layers(model, plan.removed)
        return surgery.sync_config(model)
    new_biases = False
    for part in plan.parts or [plan]:
        new_biases |= _remove_units(model, part)
    standard = surgery.sync_config(model)
    if new_biases:
        model.config.prunelab_added_biases = True
    return standard and not new_biases


def _remove_units(model: nn.Module, plan: StructuredPlan) -> bool:
    """Remove one kind's units layer by layer; True when a bias was added where there was none."""
    new_biases = False
    for layer, units in enumerate(plan.removed):
        if not units:
            continue
        if layer in plan.compensation:
            _, output_proj, _ = _projections(model, layer, plan.unit)
            new_biases |= output_proj.bias is None
            _add_bias(output_proj, plan.compensation[layer])
        if plan.unit == "heads":
            surgery.remove_heads(model, layer, units)
        else:
            surgery.remove_neurons(model, layer, units)
    return new_biases


def _add_bias(module: nn.Module, delta: torch.Tensor) -> None:
    delta = delta.to(module.weight.device, module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.add_(delta)
