"""Structured pruning of a model: score the units, choose the ones to remove, remove them for real.

One pass of the layer conveyor over the calibration windows collects what the scores need from the
dense model (the input statistics of each layer's output projection: o_proj for heads, down_proj /
c_proj / fc2 for neurons; or the layer-to-layer cosines for layers). Taylor scores take gradients of
the causal-LM loss instead (a backward pass of the whole model per calibration window). Then
:mod:`prunelab.prune.structured.select` picks the units and :mod:`prunelab.models.surgery` removes
them; with FLAP the removed channels' mean contribution is added to the output projection's bias.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
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


@dataclass
class StructuredPlan:
    """What goes: per layer the unit indices (heads, neurons), or the layer indices (layers)."""

    unit: str
    score: str
    removed: list[list[int]] | list[int]
    scores: list[list[float]] | list[float]
    compensation: dict[int, torch.Tensor] = field(default_factory=dict)  # FLAP: layer -> bias to add


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
    adapter = get_adapter(model)
    walk = LayerWalk(adapter, torch.device(device))
    walk.capture(list(calib_ids.split(batch_size)))
    out: list[InputStats] = []

    def visit(stop: LayerStop) -> list[torch.Tensor]:
        _, output_proj, _ = _projections(model, stop.index, unit)
        module = PrunableModule(stop.index, "out", "out", output_proj)
        with collect_stats([module], frozenset({SQ_NORM, SUM}), torch.device("cpu")) as collector:
            outputs = walk.forward(stop, observer=collector)
        out.append(collector.stats["out"])
        return outputs

    was_training = model.training
    model.eval()
    try:
        walk.run(visit, desc=f"{unit} statistics")
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
                out.append(flap.unit_scores(_weight(output_proj), variance, width))
        else:
            if grads is None:
                raise ValueError("taylor scores need gradients (taylor_gradients)")

            def pair(module: nn.Module, part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
                grad = grads[names[id(module)] + ".weight"]  # the parameter's layout: Conv1D's is [in, out]
                grad = grad.t() if isinstance(module, Conv1D) else grad
                return _weight(module)[part], grad[part]

            out.append(taylor.unit_scores([pair(m, part) for m, part in rows], [pair(output_proj)], width))
    return out


def plan_units(model: nn.Module, unit: str, score: str, fraction: float, scores: list[torch.Tensor],
               allocation: str = "uniform", protect: Iterable[int] = (), stats: list[InputStats] | None = None,
               heads: str = "per_group") -> StructuredPlan:
    """Choose the heads or neurons to remove from their ``scores``.

    ``allocation``: ``uniform`` (the same count in every layer not protected) or ``global`` (FLAP's
    ranking over all layers of standardised scores). Heads of GQA models: ``per_group`` removes the
    same number of query heads from every KV group, ``groups`` whole KV groups.
    """
    check_plan(model, unit, fraction, allocation, protect, heads)
    grouped_heads = unit == "heads" and _gqa(model)
    if allocation == "global":
        # one module kind is ranked at a time, so FLAP's standardisation keeps the order; it matters
        # once heads and neurons are ranked together
        removed = select.global_ranking(flap.standardize(scores) if score == "flap" else scores, fraction, protect)
    elif grouped_heads:
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
    plan = StructuredPlan(unit, score, removed, [s.tolist() for s in scores])
    if score == "flap" and stats is not None:
        for layer, units in enumerate(removed):
            if units:
                _, output_proj, width = _projections(model, layer, unit)
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
    if allocation not in ("uniform", "global"):
        raise ValueError(f"structure.allocation must be uniform or global, not {allocation!r}")
    layers = get_adapter(model).num_layers
    if len(set(protect) & set(range(layers))) == layers:
        raise ValueError("structure.protect names every layer: nothing would be removed")
    if unit == "heads":
        n_heads, n_kv, _ = surgery.attention_shape(model, 0)
        if _gqa(model):
            if allocation == "global":
                raise ValueError("structure.allocation=global ranks heads across layers without regard to KV groups; "
                                 "with grouped-query attention use allocation=uniform")
            per_group = n_heads // n_kv
            count = round(n_kv * fraction) if heads == "groups" else round(per_group * fraction)
            whole = n_kv if heads == "groups" else per_group
            if not 0 < count < whole:
                what = "KV groups" if heads == "groups" else "query heads of each KV group"
                raise ValueError(f"structure.fraction={fraction} removes {count} of the {whole} {what}; choose a "
                                 f"fraction that removes between 1 and {whole - 1}")
            return
        if heads == "groups" and n_kv == 1:
            raise ValueError("the model has one KV head: structure.heads=groups would remove all heads")
        units = n_heads
    elif unit == "neurons":
        units = surgery.mlp_width(model, 0)
    else:
        return
    if allocation == "uniform" and round(units * fraction) == 0:
        raise ValueError(f"structure.fraction={fraction} of {units} {unit} per layer rounds to none; choose a larger fraction")


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
    standard = surgery.sync_config(model)
    if new_biases:
        model.config.prunelab_added_biases = True
    return standard and not new_biases


def _add_bias(module: nn.Module, delta: torch.Tensor) -> None:
    delta = delta.to(module.weight.device, module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.add_(delta)
