"""The run's objective: the metric(s) ``optimized_metric`` names, for sweepers and W&B sweeps.

``optimized_metric`` is a dotted path into results.json's ``metrics`` (``perplexity.wikitext2.ppl``,
``zeroshot.mean_acc``, ``latency.decode.ms_per_token.median``, ``size.params.total``), or a list of
them for a multi-objective search (Optuna with several directions); null means the first perplexity
the evaluation preset computes. ``python -m prunelab`` returns the value (a list for a list) to
Hydra's sweeper, and the W&B run's summary holds it as ``objective`` (the first path) and
``objective/<path>`` (each path), the names the sweep specs in ``sweeps/`` optimise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from omegaconf import ListConfig

log = logging.getLogger(__name__)


def metric_paths(cfg: Any) -> list[str]:
    """The paths ``cfg.optimized_metric`` names (null: the first perplexity dataset, when perplexity runs)."""
    value = cfg.optimized_metric
    if value is None:
        ppl = cfg.eval.perplexity
        return [f"perplexity.{ppl.datasets[0]}.ppl"] if ppl.enabled and ppl.datasets else []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def produced_groups(cfg: Any) -> dict[str, bool]:
    """Each top-level group of ``metrics`` and whether this run's settings produce it."""
    pruning = cfg.method.name != "dense"
    return {
        "perplexity": bool(cfg.eval.perplexity.enabled),
        "zeroshot": bool(cfg.eval.zeroshot.enabled),
        "latency": bool(cfg.eval.latency.enabled),
        "size": bool(cfg.eval.size.enabled),
        "sparsity": pruning,
        "pruning": pruning,
        "finetune": cfg.finetune.name != "none" and cfg.schedule.name == "oneshot",
        "schedule": cfg.schedule.name != "oneshot",
        "structure": cfg.structure.name != "none",
    }


def check_paths(cfg: Any) -> list[str]:
    """Refuse, before anything loads, a path into a metric group or a dataset this run does not produce.

    Returns the paths. Raises ValueError naming the path and what to set instead.
    """
    value = cfg.optimized_metric
    listed = isinstance(value, (list, tuple, ListConfig))
    if value is not None and not isinstance(value, str) and not (listed and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"optimized_metric={value!r} must be a dotted path (perplexity.wikitext2.ppl) or a list of them")
    paths = metric_paths(cfg)
    groups = produced_groups(cfg)
    for path in paths:
        parts = path.split(".")
        head = parts[0]
        if head not in groups:
            raise ValueError(f"optimized_metric={path!r}: results.json has no metrics group {head!r}; "
                             f"groups: {', '.join(groups)}")
        if not groups[head]:
            raise ValueError(f"optimized_metric={path!r}: this run computes no {head} metrics (enable them, e.g. "
                             f"eval.{head}.enabled=true, or name another metric)")
        datasets = list(cfg.eval.perplexity.datasets)
        if head == "perplexity" and (len(parts) < 3 or parts[1] not in datasets):
            raise ValueError(f"optimized_metric={path!r}: perplexity paths read perplexity.<dataset>.ppl with a "
                             f"dataset of eval.perplexity.datasets ({', '.join(datasets)})")
    return paths


def lookup(metrics: Mapping[str, Any], path: str) -> float:
    """The number at ``path`` in ``metrics``; NaN (with a warning) when the run did not record it."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            log.warning("optimized_metric %s: not in this run's metrics (no %r); the objective is NaN", path, part)
            return math.nan
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        log.warning("optimized_metric %s is %r, not a number; the objective is NaN", path, node)
        return math.nan
    return float(node)


def objective(metrics: Mapping[str, Any], paths: list[str]) -> dict[str, Any]:
    """``{"metric": paths, "value": number or list}`` (``value`` None when no path is named)."""
    values = [lookup(metrics, path) for path in paths]
    value: Any = None if not values else values[0] if len(values) == 1 else values
    return {"metric": paths[0] if len(paths) == 1 else paths, "value": value}


class MetricError(ValueError):
    """A metric the config asked for is missing or not a finite number: the run failed, it is not complete."""


def check_numbers(metrics: Mapping[str, Any], cfg: Any) -> None:
    """Refuse to call a run complete when a number it was asked for is missing, NaN or infinite.

    Checked: the perplexity of every dataset of ``eval.perplexity.datasets`` (when enabled) and
    every ``optimized_metric`` path. Raises :class:`MetricError`
    naming the first offender; the runner then writes failed.json (with the metrics) instead of
    results.json.
    """
    wanted: list[str] = []
    if cfg.eval.perplexity.enabled:
        wanted += [f"perplexity.{name}.ppl" for name in cfg.eval.perplexity.datasets]
    wanted += [path for path in metric_paths(cfg) if path not in wanted]
    for path in wanted:
        node: Any = metrics
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise MetricError(f"{path} was asked for but this run produced {node!r}; no results.json is written")
        if not math.isfinite(node):
            hint = ""
            if path.startswith("perplexity."):
                record = metrics["perplexity"][path.split(".")[1]]
                hint = (f" ({record.get('predicted_tokens')} predicted tokens, mean NLL {record.get('mean_nll')}; "
                        "a window predicts eval.perplexity.seqlen - 1 tokens)")
            raise MetricError(f"{path} is {node}{hint}: not a number, so the run is failed, not complete")


def summary_entries(record: Mapping[str, Any]) -> dict[str, float]:
    """The W&B summary entries of an objective record: ``objective`` and ``objective/<path>``."""
    metric, value = record["metric"], record["value"]
    if value is None:
        return {}
    paths, values = ([metric], [value]) if isinstance(metric, str) else (list(metric), list(value))
    entries = {"objective": values[0]}
    entries.update({f"objective/{p}": v for p, v in zip(paths, values)})
    return entries
