"""Tables in the papers' layout: rows = method (+ allocation), columns = sparsity / pattern.

A :class:`Table` holds formatted cells; :func:`to_markdown` and :func:`to_latex` render it. The builders
take :class:`~prunelab.report.Run` records and aggregate runs that land in the same cell (seeds) as
mean ± standard deviation.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from prunelab.report import Run

log = logging.getLogger(__name__)

METHOD_ORDER = ("dense", "random", "magnitude", "sparsegpt", "wanda")
DENSE_COLUMN = "0% (dense)"


@dataclass
class Table:
    """A formatted table: ``cells[row][col]`` is the text of a cell ("–" where no run exists)."""

    title: str
    corner: str
    rows: list[str]
    cols: list[str]
    cells: dict[str, dict[str, str]]
    notes: list[str] = field(default_factory=list)
    key: str = ""  # short id used for file names
    # a paper's row header in several columns (``Method | Sparsity``): their names, and each row's values
    lead_cols: list[str] = field(default_factory=list)
    lead: dict[str, list[str]] = field(default_factory=dict)

    def cell(self, row: str, col: str) -> str:
        return self.cells.get(row, {}).get(col, "–")

    def header(self) -> list[str]:
        return (self.lead_cols or [self.corner]) + self.cols

    def line(self, row: str) -> list[str]:
        return (self.lead.get(row, [row]) if self.lead_cols else [row]) + [self.cell(row, col) for col in self.cols]


# ------------------------------------------------------------------------------------------ row / column
def allocation_suffix(run: "Run") -> str:
    """`` + owl`` for a non-uniform allocation, empty for uniform allocation and for the dense model."""
    if run.method == "dense" or run.allocation in (None, "", "uniform"):
        return ""
    return f" + {run.allocation}"


def row_label(run: "Run") -> str:
    """Method name, plus the allocation when it is not uniform, the schedule when it is not one-shot and
    the fine-tuning when there is one (``wanda + owl``, ``magnitude + iterative + masked FT``); a
    structured run is its unit and score (``neurons (wanda)``)."""
    structure = run.structure
    if structure.get("name", "none") != "none":
        label = f"{structure['name']} ({structure.get('score')})"
        if structure["name"] == "heads" and structure.get("heads", "per_group") != "per_group":
            label += f" {structure['heads']}"
        if structure["name"] != "layers" and structure.get("allocation", "uniform") != "uniform":
            label += f" + {structure['allocation']}"
        if run.finetune != "none":
            label += f" + {run.finetune} FT"
        return label
    label = run.method + allocation_suffix(run)
    if run.schedule != "oneshot":
        label += f" + {run.schedule}"
    if run.finetune != "none":
        label += f" + {run.finetune} FT"
    return label


def format_sparsity(sparsity: float) -> str:
    return f"{round(100 * float(sparsity), 4):g}%"


def col_label(run: "Run") -> str:
    """``0% (dense)`` for the dense model, ``2:4`` for N:M, else the target sparsity in percent."""
    structure = run.structure
    if structure.get("name", "none") == "layers":
        return f"{structure.get('count')} layers"
    if structure.get("name", "none") != "none":
        return f"{format_sparsity(structure.get('fraction', 0.0))} {structure['name']}"
    if run.method == "dense":
        return DENSE_COLUMN
    if run.pattern not in (None, "", "unstructured"):
        return str(run.pattern)
    return format_sparsity(run.sparsity)


def row_sort_key(label: str) -> tuple:
    method = label.split(" + ")[0]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, " + " in label, label)


def col_sort_key(label: str) -> tuple:
    if label == DENSE_COLUMN:
        return (0, 0.0, 0)
    if label.endswith("%"):
        return (1, float(label[:-1]), 0)
    if ":" in label:
        n, m = (int(x) for x in label.split(":"))
        return (2, n / m, m)
    number, _, unit = label.partition(" ")  # structured: "4 layers", "20% neurons"
    return (3, unit, float(number.rstrip("%")))


# ------------------------------------------------------------------------------------------------ values
def format_value(value: float, kind: str) -> str:
    """Perplexity with 2 decimals (scientific above 10^4), accuracy in percent with 2 decimals."""
    if kind == "acc":
        return f"{100 * value:.2f}"
    return f"{value:.1e}" if abs(value) >= 1e4 else f"{value:.2f}"


def _aggregate(values: list[float], kind: str) -> str:
    text = format_value(statistics.fmean(values), kind)
    if len(values) > 1:
        spread = statistics.stdev(values)
        text += f" ± {format_value(spread, kind)} (n={len(values)})"
    return text


# config entries that may differ between runs averaged into one cell (seeds, paths, logging, devices)
IGNORED_CONFIG_KEYS = ("seed", "calib.seed", "tags", "run_dir", "cache_dir", "data_root", "device", "prune.device",
                       "experiment")
IGNORED_CONFIG_PREFIXES = ("logger.", "eval.latency.", "eval.size.")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def config_differences(runs: list["Run"]) -> list[str]:
    """Config keys (besides seeds, paths and logging) whose values differ between ``runs``."""
    flats = [{k: v for k, v in flatten(run.config).items()
              if k not in IGNORED_CONFIG_KEYS and not k.startswith(IGNORED_CONFIG_PREFIXES)} for run in runs]
    keys = set().union(*flats) if flats else set()
    return sorted(k for k in keys if len({repr(flat.get(k)) for flat in flats}) > 1)


def build_table(runs: Iterable["Run"], value: Callable[["Run"], float | None], kind: str, title: str,
                corner: str, key: str) -> Table | None:
    """Place ``value(run)`` of every run in its (method, sparsity) cell; None when no run has a value.

    Runs sharing a cell are averaged; when their configs differ in more than the seed, a note says which keys.
    """
    grouped: dict[tuple[str, str], list["Run"]] = defaultdict(list)
    for run in runs:
        if value(run) is not None:
            grouped[(row_label(run), col_label(run))].append(run)
    if not grouped:
        return None
    rows = sorted({r for r, _ in grouped}, key=row_sort_key)
    cols = sorted({c for _, c in grouped}, key=col_sort_key)
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    notes = []
    for (row, col), members in grouped.items():
        cells[row][col] = _aggregate([float(value(run)) for run in members], kind)
        differ = config_differences(members)
        if differ:
            notes.append(f"WARNING: {row} @ {col} averages runs whose configs differ in {', '.join(differ)} "
                         f"({', '.join(run.name for run in members)})")
            log.warning("%s: %s", title, notes[-1])
    return Table(title=title, corner=corner, rows=rows, cols=cols, cells=dict(cells), notes=notes, key=key)


def _protocol_notes(runs: list["Run"], dataset: str) -> list[str]:
    """Describe the perplexity protocol of a table; flag runs whose protocols differ."""
    protocols = defaultdict(list)
    for run in runs:
        entry = run.perplexity.get(dataset)
        if entry:
            protocols[(entry.get("seqlen"), entry.get("windows"), entry.get("fingerprint"))].append(run)
    notes = []
    for (seqlen, windows, fingerprint), members in protocols.items():
        fp = f", token stream {str(fingerprint)[:19]}" if fingerprint else ""
        partial = any(run.ppl_full_split(dataset) is False for run in members)
        part = " (not the full split)" if partial else ""
        notes.append(f"seqlen {seqlen}, {windows} windows{part}{fp}" + (f" ({len(members)} runs)" if len(protocols) > 1 else ""))
    if len(protocols) > 1:
        notes.insert(0, "WARNING: runs in this table used different perplexity protocols; numbers are not comparable")
        log.warning("perplexity on %s: %d different protocols in one table (%s)", dataset, len(protocols), notes[1:])
    return notes


def perplexity_tables(runs: list["Run"], datasets: list[str] | None = None) -> list[Table]:
    """One table per (model, eval preset, dataset)."""
    tables = []
    for (model, eval_name), group in _by_model_and_eval(runs).items():
        names = sorted({d for run in group for d in run.perplexity}) if datasets is None else datasets
        for dataset in names:
            table = build_table(group, lambda run, d=dataset: run.ppl(d), "ppl",
                                title=f"Perplexity ({dataset}) — {model}, eval={eval_name}",
                                corner="method", key=f"ppl_{dataset}_{model}_{eval_name}")
            if table is not None:
                table.notes = _protocol_notes(group, dataset) + table.notes
                tables.append(table)
    return tables


def zeroshot_tables(runs: list["Run"], acc_key: str = "acc") -> list[Table]:
    """Per (model, eval preset): mean accuracy in the sweep layout, and a per-task table."""
    tables = []
    for (model, eval_name), group in _by_model_and_eval(runs).items():
        mean = build_table(group, lambda run: run.mean_acc(acc_key), "acc",
                           title=f"Zero-shot mean accuracy (%, {acc_key}) — {model}, eval={eval_name}",
                           corner="method", key=f"zeroshot_mean_{model}_{eval_name}")
        if mean is None:
            continue
        tables.append(mean)
        tasks = sorted({task for run in group for task in run.zeroshot_tasks})
        grouped: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in group:
            label = f"{row_label(run)} @ {col_label(run)}"
            for task in tasks:
                value = run.task_acc(task, acc_key)
                if value is not None:
                    grouped[label][task].append(value)
            value = run.mean_acc(acc_key)
            if value is not None:
                grouped[label]["mean"].append(value)
        rows = sorted(grouped, key=lambda r: (row_sort_key(r.split(" @ ")[0]), col_sort_key(r.split(" @ ")[1])))
        cells = {row: {col: _aggregate(vals, "acc") for col, vals in grouped[row].items()} for row in rows}
        tables.append(Table(title=f"Zero-shot accuracy per task (%, {acc_key}) — {model}, eval={eval_name}",
                            corner="method @ sparsity", rows=rows, cols=tasks + ["mean"], cells=cells,
                            key=f"zeroshot_tasks_{model}_{eval_name}"))
    return tables


def _by_model_and_eval(runs: list["Run"]) -> dict[tuple[str, str], list["Run"]]:
    groups: dict[tuple[str, str], list["Run"]] = defaultdict(list)
    for run in runs:
        groups[(run.model, run.eval_name)].append(run)
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------------------------ render
def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with the title as a heading and notes below."""
    lead = len(table.lead_cols) or 1
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header()) + " |",
             "|" + "|".join([":---"] * lead + ["---:"] * len(table.cols)) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(table.line(row)) + " |")
    lines += [""] + [f"_{note}_  " for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    return (out.replace("±", r"$\pm$").replace("–", "--").replace("—", "---")
            .replace("✓", r"\checkmark").replace("✗", r"$\times$"))


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``, and ``amssymb`` for ✓)."""
    spec = "l" * (len(table.lead_cols) or 1) + "r" * len(table.cols)
    lines = [
        r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
        rf"\label{{tab:{re.sub(r'[^A-Za-z0-9_:.-]', '-', table.key)}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
        " & ".join(latex_escape(c) for c in table.header()) + r" \\", r"\midrule",
    ]
    for row in table.rows:
        lines.append(" & ".join(latex_escape(c) for c in table.line(row)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\smallskip{\footnotesize " + latex_escape("; ".join(table.notes)) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
