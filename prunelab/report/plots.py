"""PNG plots of a sweep: perplexity vs sparsity per method, per-layer achieved sparsity of each run, and
the sparsity–perplexity trajectory of each schedule (one-shot, iterative, lottery and its controls)."""

from __future__ import annotations

import logging
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from prunelab.report.tables import allocation_suffix, col_label, col_sort_key, row_label, row_sort_key  # noqa: E402

if TYPE_CHECKING:
    from prunelab.report import Run

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def plot_ppl_vs_sparsity(runs: list["Run"], dataset: str, title: str, path: Path) -> Path | None:
    """Lines: unstructured runs of each method (+ allocation); markers: N:M runs; dotted line: dense.

    A method keeps one colour; a non-uniform allocation (OWL) draws its line dashed, and each N:M
    pattern has its own marker. The legend sits right of the axes. Runs that share a point (seeds)
    are averaged. Returns None when no run has this dataset.
    """
    lines: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    nm_points: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    dense: list[float] = []
    for run in runs:
        ppl = run.ppl(dataset)
        if ppl is None:
            continue
        if run.method == "dense":
            dense.append(ppl)
        elif run.pattern not in ("", "unstructured"):
            nm_points[(run.method, row_label(run), run.pattern)].append(ppl)
        else:
            lines[(run.method, row_label(run))][100 * run.sparsity].append(ppl)
    if not (lines or nm_points or dense):
        return None
    methods = sorted({m for m, _ in lines} | {m for m, _, _ in nm_points}, key=row_sort_key)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {method: palette[i % len(palette)] for i, method in enumerate(methods)}
    patterns = sorted({p for _, _, p in nm_points}, key=col_sort_key)
    markers = ["s", "D", "^", "v", "P", "X"]
    marker = {p: markers[i % len(markers)] for i, p in enumerate(patterns)}
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for method, label in sorted(lines, key=lambda key: row_sort_key(key[1])):
        points = lines[(method, label)]
        xs = sorted(points)
        ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", color=color[method],
                linestyle="-" if label == method else "--", label=label)
    for (method, label, pattern), values in sorted(nm_points.items(), key=lambda kv: (row_sort_key(kv[0][1]),
                                                                                       col_sort_key(kv[0][2]))):
        n, m = (int(x) for x in pattern.split(":"))
        ax.scatter([100 * n / m], [statistics.fmean(values)], marker=marker[pattern], s=50, color=color[method],
                   edgecolors="black", label=f"{label} {pattern}", zorder=3)
    if dense:
        ax.axhline(statistics.fmean(dense), color="black", linestyle=":", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(f"perplexity ({dataset})")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def layer_sparsity_panels(runs: list["Run"]) -> dict[str, list[tuple[str, "Run"]]]:
    """The per-layer plot's layout: method -> [(legend label, run)], methods and lines in table order.

    A label is the target plus the allocation when it is not uniform (``60% + owl``); labels that
    would repeat within a panel (seeds, or other swept keys) get the run's folder appended.
    """
    by_method: dict[str, list["Run"]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    panels = {}
    for method in sorted(by_method, key=row_sort_key):
        group = sorted(by_method[method], key=lambda r: (col_sort_key(col_label(r)), r.allocation != "uniform",
                                                         r.allocation, r.name))
        labels = [col_label(r) + allocation_suffix(r) for r in group]
        panels[method] = [(f"{label} ({run.name})" if labels.count(label) > 1 else label, run)
                          for label, run in zip(labels, group)]
    return panels


def plot_layer_sparsity(runs: list["Run"], title: str, path: Path) -> Path | None:
    """Achieved sparsity of each decoder layer: one panel per method, one line per run.

    Within a panel the colour names the target (50%, 2:4, ...) and the line style the allocation
    (solid uniform, dashed otherwise), so a run with OWL sits next to its uniform twin. The legend
    goes below each panel, never over the curves. None when no run recorded per-layer sparsity.
    """
    runs = [run for run in runs if run.layer_sparsity]
    if not runs:
        return None
    panels = layer_sparsity_panels(runs)
    targets = sorted({col_label(run) for run in runs}, key=col_sort_key)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {target: palette[i % len(palette)] for i, target in enumerate(targets)}
    styles = ["-", "--", ":", "-."]
    allocations = sorted({run.allocation for run in runs}, key=lambda a: (a != "uniform", a))
    style = {alloc: styles[i % len(styles)] for i, alloc in enumerate(allocations)}
    most = max(len(lines) for lines in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4 + 0.16 * most),
                             sharey=True, squeeze=False)
    for ax, (method, lines) in zip(axes[0], panels.items()):
        for label, run in lines:
            layers = run.layer_sparsity
            ax.plot(list(layers), [100 * v for v in layers.values()], marker=".", markersize=3,
                    linewidth=1.2, color=color[col_label(run)], linestyle=style[run.allocation], label=label)
        ax.set_title(method, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False,
                  ncol=2 if len(lines) > 4 else 1)
    axes[0][0].set_ylabel("achieved sparsity (%)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _schedule_label(run: "Run") -> str:
    """The run's table row (it names a schedule other than one-shot and the fine-tuning), one-shot said."""
    label = row_label(run)
    return label if run.schedule != "oneshot" else label.replace(run.method, f"{run.method} one-shot", 1)


def plot_trajectories(runs: list["Run"], dataset: str, title: str, path: Path) -> Path | None:
    """Sparsity against perplexity along each run's schedule.

    Thin lines with small markers: the steps or rounds of iterative and lottery runs, scored on the
    schedule's first ``eval_windows`` windows; large markers: every run's final perplexity with its
    ``eval`` preset (one-shot runs have only this point); crosses: lottery controls (same preset).
    Returns None when no run has a schedule trajectory.
    """
    traced = [run for run in runs if (run.metrics.get("schedule") or {}).get("trajectory")]
    if not traced:
        return None
    key = f"ppl_{dataset}"
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(sorted(runs, key=_schedule_label)):
        colour = palette[i % len(palette)]
        label = _schedule_label(run)
        schedule = run.metrics.get("schedule") or {}
        points = [(100 * p["achieved"], p[key]) for p in schedule.get("trajectory", []) if p.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "-o", color=colour, linewidth=1, markersize=3, alpha=0.7)
        final = run.ppl(dataset)
        overall = (run.metrics.get("sparsity") or {}).get("overall")
        if final is not None and overall is not None:
            ax.plot([100 * overall], [final], "o", color=colour, markersize=8, label=label)
        for branch, control in (schedule.get("controls") or {}).items():
            ppl = ((control.get("evaluation") or {}).get("perplexity") or {}).get(dataset, {}).get("ppl")
            if ppl is not None:
                ax.plot([100 * control["achieved"]], [ppl], "x", color=colour, markersize=9, label=f"{label}: {branch} control")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the pruned Linear modules (%)")
    ax.set_ylabel(f"{dataset} perplexity (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(runs: list["Run"], out_dir: Path, datasets: list[str] | None = None) -> list[Path]:
    """All plots of a sweep, per model: ``ppl_<dataset>_<model>.png`` and ``layer_sparsity_<model>.png``."""
    by_model: dict[str, list["Run"]] = defaultdict(list)
    for run in runs:
        by_model[run.model].append(run)
    written = []
    for model, group in sorted(by_model.items()):
        names = datasets or sorted({d for run in group for d in run.perplexity})
        for dataset in names:
            by_eval: dict[str, list["Run"]] = defaultdict(list)
            for run in group:
                by_eval[run.eval_name].append(run)
            for eval_name, subset in sorted(by_eval.items()):
                suffix = f"_{eval_name}" if len(by_eval) > 1 else ""
                path = out_dir / f"ppl_{_slug(dataset)}_{_slug(model)}{_slug(suffix)}.png"
                done = plot_ppl_vs_sparsity(subset, dataset, f"{model}: perplexity vs sparsity (eval={eval_name})", path)
                if done:
                    written.append(done)
        done = plot_layer_sparsity(group, f"{model}: per-layer achieved sparsity", out_dir / f"layer_sparsity_{_slug(model)}.png")
        if done:
            written.append(done)
        for dataset in names:
            done = plot_trajectories(group, dataset, f"{model}: schedules, sparsity vs perplexity (lines: steps on the "
                                     f"schedule's quick windows; large markers: final, eval preset)",
                                     out_dir / f"schedule_{_slug(dataset)}_{_slug(model)}.png")
            if done:
                written.append(done)
    log.info("wrote %d plots into %s", len(written), out_dir)
    return written
