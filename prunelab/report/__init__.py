"""Sweep reports: collect every run's ``results.json`` under a folder, write tables, plots and the list of
runs that did not finish or never started.

``python -m prunelab.report <sweep folder> [--metric ppl|ppl:<dataset>|zeroshot] [--out DIR]``

A run folder is *complete* when its ``results.json`` says ``"status": "complete"``. A Hydra job folder
(one holding ``.hydra/``) without such a file is *incomplete*: failed or interrupted (``failed.json``, whose
error is shown), unfinished, or unreadable. A job of a sweep's grid (``multirun.yaml``, see
:mod:`prunelab.report.grid`) with no folder at all was *never launched*. Every one is named, with its
overrides, in the log and in the Markdown report.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.tracking.files import COMPLETE, FAILED_FILE, RESULTS_FILE, SKIPPED_FILE
from prunelab.report.grid import GridCheck, check_grids, read_overrides, relative_name

log = logging.getLogger(__name__)



@dataclass
class Run:
    """One finished run, read from its ``results.json``."""

    name: str  # folder relative to the sweep folder
    results: dict[str, Any]
    skipped: bool = False  # the last invocation found these results complete and ran nothing (skipped.json)
    overrides: list[str] = field(default_factory=list)  # the job's .hydra/overrides.yaml (empty: none)

    @property
    def config(self) -> dict[str, Any]:
        return self.results.get("config") or {}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.results.get("metrics") or {}

    def _option(self, group: str, default: str) -> str:
        """The ``name`` of config group ``group`` (``default`` when the run's config lacks it)."""
        return str((self.config.get(group) or {}).get("name", default))

    @property
    def model(self) -> str:
        return self._option("model", "?")

    @property
    def method(self) -> str:
        return self._option("method", "?")

    @property
    def allocation(self) -> str:
        return self._option("allocation", "uniform")

    @property
    def schedule(self) -> str:
        return self._option("schedule", "oneshot")

    @property
    def finetune(self) -> str:
        return self._option("finetune", "none")

    @property
    def structure(self) -> dict[str, Any]:
        return self.config.get("structure") or {"name": "none"}

    @property
    def sparsity(self) -> float:
        """The target sparsity; a lottery run's is its last round's, 1 - (1 - rate)^rounds."""
        schedule = self.config.get("schedule") or {}
        if schedule.get("name") == "lottery":
            return 1 - (1 - float(schedule["rate"])) ** int(schedule["rounds"])
        return float(self.config.get("sparsity", 0.0))

    @property
    def pattern(self) -> str:
        return str(self.config.get("pattern", "unstructured"))

    @property
    def eval_name(self) -> str:
        return str((self.config.get("eval") or {}).get("name", "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def perplexity(self) -> dict[str, dict[str, Any]]:
        return self.metrics.get("perplexity") or {}

    def ppl(self, dataset: str) -> float | None:
        entry = self.perplexity.get(dataset)
        return None if not entry or entry.get("ppl") is None else float(entry["ppl"])

    def ppl_full_split(self, dataset: str) -> bool | None:
        """Whether the perplexity covers every window of the split (``full_split``; ``complete`` in older files)."""
        entry = self.perplexity.get(dataset) or {}
        value = entry.get("full_split", entry.get("complete"))
        return None if value is None else bool(value)

    @property
    def zeroshot_tasks(self) -> dict[str, dict[str, float]]:
        return (self.metrics.get("zeroshot") or {}).get("tasks") or {}

    def task_acc(self, task: str, key: str = "acc") -> float | None:
        value = self.zeroshot_tasks.get(task, {}).get(key)
        return None if value is None else float(value)

    def mean_acc(self, key: str = "acc") -> float | None:
        """Mean over tasks of ``key``; the recorded ``mean_acc`` when no per-task values exist."""
        values = [v[key] for v in self.zeroshot_tasks.values() if v.get(key) is not None]
        if values:
            return statistics.fmean(float(v) for v in values)
        recorded = (self.metrics.get("zeroshot") or {}).get("mean_acc")
        return None if recorded is None or key != "acc" else float(recorded)

    @property
    def layer_sparsity(self) -> dict[int, float]:
        per_layer = (self.metrics.get("sparsity") or {}).get("per_layer") or {}
        return {int(k): float(v) for k, v in sorted(per_layer.items(), key=lambda kv: int(kv[0]))}


@dataclass
class IncompleteRun:
    """A job folder without a complete ``results.json``."""

    name: str
    reason: str
    overrides: list[str] = field(default_factory=list)

    def describe(self) -> str:
        extra = f" [{' '.join(self.overrides)}]" if self.overrides else ""
        return f"{self.name}: {self.reason}{extra}"


def _failure_reason(folder: Path) -> str:
    """``failed during <phase>: <error>`` (or ``interrupted ...``) from the job's ``failed.json``."""
    try:
        info = json.loads((folder / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return f"failed ({FAILED_FILE} unreadable)"
    if not isinstance(info, dict):
        return "failed"
    message = ""
    for key in ("error", "exception", "message", "reason"):
        if info.get(key):
            message = str(info[key]).strip().splitlines()[-1][:200]
            break
    status = "interrupted" if info.get("status") == "interrupted" else "failed"
    if info.get("phase"):
        status += f" during {info['phase']}"
    return f"{status}: {message}" if message else status


def collect_runs(folder: str | os.PathLike, log_incomplete: bool = True) -> tuple[list[Run], list[IncompleteRun]]:
    """Read every ``results.json`` under ``folder`` and find job folders that did not complete
    (each logged as a warning unless ``log_incomplete`` is False).

    Returns:
        ``(complete runs, incomplete runs)``, both sorted by folder name.

    Raises:
        FileNotFoundError: when ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {str(folder)!r} does not exist or is not a directory")
    runs: list[Run] = []
    incomplete: dict[Path, IncompleteRun] = {}
    candidates = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    candidates |= {p.parent for p in root.rglob(RESULTS_FILE)} | {p.parent for p in root.rglob(FAILED_FILE)}
    for run_dir in sorted(candidates):
        name = relative_name(run_dir, root)
        results_path = run_dir / RESULTS_FILE
        reason = None
        if results_path.is_file():
            try:
                results = json.loads(results_path.read_text())
            except (OSError, ValueError) as err:
                reason = f"{RESULTS_FILE} unreadable ({err})"
            else:
                status = results.get("status") if isinstance(results, dict) else None
                if status == COMPLETE:
                    runs.append(Run(name=name, results=results, skipped=(run_dir / SKIPPED_FILE).is_file(),
                                    overrides=read_overrides(run_dir)))
                    continue
                reason = f"status={status!r} in {RESULTS_FILE}"
                if (run_dir / FAILED_FILE).is_file():
                    reason = _failure_reason(run_dir)
        elif (run_dir / FAILED_FILE).is_file():
            reason = _failure_reason(run_dir)
        else:
            reason = f"no {RESULTS_FILE} (unfinished or killed)"
        incomplete[run_dir] = IncompleteRun(name=name, reason=reason, overrides=read_overrides(run_dir))
    for item in incomplete.values() if log_incomplete else ():
        log.warning("incomplete run %s", item.describe())
    skipped = sum(run.skipped for run in runs)
    log.info("%s: %d complete runs (%d of them skipped by the last invocation: complete before), %d incomplete",
             root, len(runs), skipped, len(incomplete))
    return runs, list(incomplete.values())


def build_report(folder: str | os.PathLike, out: str | os.PathLike | None = None, metrics: list[str] | None = None,
                 acc_key: str = "acc", plots: bool = True) -> dict[str, Any]:
    """Write ``report.md``, ``tables.tex`` and PNG plots for the sweep in ``folder``.

    Args:
        folder: a sweep (Hydra multirun) folder or any folder holding run folders.
        out: where to write; default ``<folder>/report``.
        metrics: any of ``ppl`` (all datasets), ``ppl:<dataset>``, ``zeroshot``; default: all available.
        acc_key: zero-shot metric per task (``acc`` or ``acc_norm``).
        plots: write PNG plots.

    Returns:
        ``{"markdown", "latex", "plots": [...], "runs", "skipped": [names], "incomplete": [names],
        "never_launched": [PlannedJob]}``.
    """
    from prunelab.report import layouts
    from prunelab.report import tables as tab

    metrics = metrics or ["ppl", "zeroshot"]
    for metric in metrics:
        if metric not in ("ppl", "zeroshot") and not metric.startswith("ppl:"):
            raise ValueError(f"--metric {metric!r} is not known; use ppl, ppl:<dataset> (e.g. ppl:wikitext2) or zeroshot")
    root = Path(folder)
    out_dir = Path(out) if out is not None else root / "report"
    runs, incomplete = collect_runs(root)
    grids = check_grids(root)
    out_dir.mkdir(parents=True, exist_ok=True)

    datasets = [m.split(":", 1)[1] for m in metrics if m.startswith("ppl:")]
    # a preset's runs in its paper's layout first, with the metrics asked for
    tables: list[tab.Table] = layouts.paper_tables(runs, acc_key, None if "ppl" in metrics else datasets,
                                                   zeroshot="zeroshot" in metrics)
    if "ppl" in metrics:
        tables += tab.perplexity_tables(runs)
    elif datasets:
        tables += tab.perplexity_tables(runs, datasets)
    if "zeroshot" in metrics:
        tables += tab.zeroshot_tables(runs, acc_key)

    plot_files: list[Path] = []
    if plots and runs:
        from prunelab.report import plots as plot

        plot_files = plot.write_plots(runs, out_dir, datasets or None)

    md = [f"# Sweep report: `{root}`", "",
          f"{len(runs)} complete runs, {len(incomplete)} incomplete, {len(grids.never_launched)} never launched. "
          f"{sum(r.skipped for r in runs)} of the complete runs were skipped by the last invocation (complete before).", ""]
    md += [tab.to_markdown(t) for t in tables] or ["_No complete run holds the requested metrics._\n"]
    md += ["## Incomplete runs", ""]
    md += [f"- `{item.name}` — {item.reason}" + (f" (`{' '.join(item.overrides)}`)" if item.overrides else "")
           for item in incomplete] or ["None."]
    md += ["", "## Skipped (complete before the last invocation)", ""]
    md += [f"- `{run.name}`" for run in runs if run.skipped] or ["None."]
    md += _never_launched_section(grids)
    if plot_files:
        md += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plot_files]
    markdown_path = out_dir / "report.md"
    markdown_path.write_text("\n".join(md) + "\n")
    latex_path = out_dir / "tables.tex"
    latex_path.write_text("% needs \\usepackage{booktabs,amssymb}\n" + "\n".join(tab.to_latex(t) for t in tables))
    log.info("wrote %s, %s and %d plots", markdown_path, latex_path, len(plot_files))
    return {"markdown": markdown_path, "latex": latex_path, "plots": plot_files, "runs": len(runs),
            "skipped": [run.name for run in runs if run.skipped],
            "incomplete": [item.name for item in incomplete], "never_launched": grids.never_launched}


def _never_launched_section(grids: GridCheck) -> list[str]:
    """Markdown lines: planned jobs without a folder, and sweeps whose grid could not be checked."""
    lines = ["", "## Never launched", ""]
    if not grids.checked and not grids.unchecked:
        return lines + ["_No `multirun.yaml` below this folder: the planned grid is unknown._"]
    lines += [f"- {job.label} — `{' '.join(job.overrides)}`" for job in grids.never_launched]
    if not grids.never_launched and grids.checked:
        lines.append(f"None: every job planned in {len(grids.checked)} sweep grid(s) has a folder.")
    lines += [f"- `{sweep}`: grid not checked ({why})" for sweep, why in grids.unchecked.items()]
    return lines
