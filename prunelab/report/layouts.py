"""The papers' own table layouts, for the runs of an ``experiment=<paper table>`` preset.

The sweep tables (``prunelab.report.tables``) put methods in rows and sparsities in columns for every
sweep. A paper lays its table out its own way, and a preset's runs are also shown that way (each
run's ``experiment`` config key names its preset):

- ``models`` (SparseGPT Tables 2-4, Wanda Table 3, OWL Table 3): one table per perplexity dataset;
  rows are (method, sparsity or N:M pattern), dense first, grouped by sparsity; one column per model.
  Wanda's table adds its "weight update" column.
- ``metrics`` (LLM-Pruner Table 1, FLAP Table 2, ShortGPT Table 3): one table per model; rows are
  (how much was removed, method); columns are the perplexities, each zero-shot task and the average.

Runs that land in one cell (calibration seeds) are shown as mean ± std (n), as in the sweep tables.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from prunelab.report.tables import (
    DENSE_COLUMN,
    Table,
    _aggregate,
    _protocol_notes,
    col_label,
    col_sort_key,
    config_differences,
    row_label,
    row_sort_key,
)

if TYPE_CHECKING:
    from prunelab.report import Run


@dataclass(frozen=True)
class Layout:
    kind: str  # "models" | "metrics"
    paper: str  # the table it follows
    weight_update: bool = False  # a column saying whether the method updates the kept weights (Wanda's table)


LAYOUTS: dict[str, Layout] = {
    "sparsegpt-table": Layout("models", "SparseGPT (Frantar & Alistarh 2023), Tables 2-4"),
    "cpu-budget-table": Layout("models", "SparseGPT (Frantar & Alistarh 2023), Tables 2-4, at the CPU-budget protocol"),
    "wanda-table": Layout("models", "Wanda (Sun et al. 2024), Tables 2-3", weight_update=True),
    "owl-table": Layout("models", "OWL (Yin et al. 2024), Table 3"),
    "structured-table": Layout("metrics", "LLM-Pruner (Ma et al. 2023), Table 1; FLAP (An et al. 2024), Table 2"),
    "shortgpt-table": Layout("metrics", "ShortGPT (Men et al. 2024), Table 3"),
}

METHOD_NAMES = {"dense": "Dense", "magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "random": "Random"}
UPDATES_WEIGHTS = {"sparsegpt"}  # reconstructs the kept weights (OBS); the others only choose a mask


def method_name(run: "Run") -> str:
    """The paper's name of the run's row: ``SparseGPT``, ``Wanda w. OWL``, ``neurons (flap) + lora FT``.

    Everything :func:`~prunelab.report.tables.row_label` tells apart is told apart here too.
    """
    label = row_label(run)
    structure = run.structure
    if structure.get("name", "none") != "none":
        return label
    method, _, rest = label.partition(" + ")
    name = METHOD_NAMES.get(method, method)
    for part in rest.split(" + ") if rest else []:
        name += f" w. {part.upper()}" if part == run.allocation and part == "owl" else f" + {part}"
    return name


def amount(run: "Run") -> str:
    """What was removed: ``0%`` (dense), ``50%``, ``2:4``, ``30% neurons``, ``4 layers``."""
    label = col_label(run)
    return "0%" if label == DENSE_COLUMN else label


def _row_key(run: "Run") -> tuple:
    dense = run.method == "dense" and run.structure.get("name", "none") == "none"
    return (not dense, col_sort_key(col_label(run)), row_sort_key(row_label(run)))


def _row_id(run: "Run") -> str:
    """A row's identity: what the sweep tables tell apart (the displayed name may merge more)."""
    return f"{row_label(run)} @ {col_label(run)}"


def _fill(rows: dict[str, list["Run"]], columns: list[str], value: Callable[[str, "Run"], float | None],
          kind: Callable[[str], str], notes: list[str]) -> dict[str, dict[str, str]]:
    """Cells ``rows × columns``: the mean ± std of ``value(column, run)`` over each row's runs that have one."""
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    for row, members in rows.items():
        for col in columns:
            having = [run for run in members if value(col, run) is not None]
            if not having:
                continue
            cells[row][col] = _aggregate([float(value(col, run)) for run in having], kind(col))
            differ = config_differences(having)
            if differ and len(having) > 1:
                notes.append(f"WARNING: {row} / {col} averages runs whose configs differ in {', '.join(differ)}")
    return dict(cells)


def models_tables(runs: list["Run"], experiment: str, layout: Layout, datasets: list[str] | None = None) -> list[Table]:
    """Rows (method, sparsity), a column per model, one table per (eval preset, perplexity dataset).

    ``datasets``: only these perplexity datasets (None: every one the runs have).
    """
    tables = []
    by_eval: dict[str, list["Run"]] = defaultdict(list)
    for run in runs:
        by_eval[run.eval_name].append(run)
    for eval_name, group in sorted(by_eval.items()):
        for dataset in sorted({d for run in group for d in run.perplexity if datasets is None or d in datasets}):
            having = [run for run in group if run.ppl(dataset) is not None]
            rows: dict[str, list["Run"]] = defaultdict(list)
            lead: dict[str, list[str]] = {}
            for run in sorted(having, key=_row_key):
                key = _row_id(run)
                rows[key].append(run)
                update = "–" if run.method == "dense" else ("✓" if run.method in UPDATES_WEIGHTS else "✗")
                lead[key] = [method_name(run)] + ([update] if layout.weight_update else []) + [amount(run)]
            models = sorted({run.model for run in having})
            notes = [f"Layout of {layout.paper}; perplexity ({dataset}): " + "; ".join(_protocol_notes(having, dataset))]
            cells = _fill(rows, models, lambda model, run, d=dataset: run.ppl(d) if run.model == model else None,
                          lambda _col: "ppl", notes)
            tables.append(Table(title=f"{experiment}: {dataset} perplexity, eval={eval_name}", corner="method",
                                rows=list(rows), cols=models, cells=cells, notes=notes,
                                key=f"paper_{experiment}_{dataset}_{eval_name}",
                                lead_cols=["Method"] + (["Weight update"] if layout.weight_update else []) + ["Sparsity"],
                                lead=lead))
    return tables


def metrics_tables(runs: list["Run"], experiment: str, layout: Layout, acc_key: str = "acc",
                   datasets: list[str] | None = None, zeroshot: bool = True) -> list[Table]:
    """Rows (removed, method), columns perplexities + zero-shot tasks + average; one table per (model, eval).

    ``datasets``: only these perplexity columns (None: all); ``zeroshot``: the task columns.
    """
    tables = []
    groups: dict[tuple[str, str], list["Run"]] = defaultdict(list)
    for run in runs:
        groups[(run.model, run.eval_name)].append(run)
    for (model, eval_name), group in sorted(groups.items()):
        names = sorted({d for run in group for d in run.perplexity if datasets is None or d in datasets})
        ordered = [t for run in group for t in ((run.config.get("eval") or {}).get("zeroshot") or {}).get("tasks") or []]
        tasks = list(dict.fromkeys(t for t in ordered if any(t in run.zeroshot_tasks for run in group)))
        tasks += sorted({t for run in group for t in run.zeroshot_tasks} - set(tasks))
        tasks = tasks if zeroshot else []
        columns = [f"{d} PPL" for d in names] + tasks + (["Average"] if tasks else [])
        if not columns:
            continue

        def value(col: str, run: "Run") -> float | None:
            if col.endswith(" PPL"):
                return run.ppl(col[: -len(" PPL")])
            if col == "Average":
                return run.mean_acc(acc_key)
            return run.task_acc(col, acc_key)

        rows: dict[str, list["Run"]] = defaultdict(list)
        lead: dict[str, list[str]] = {}
        for run in sorted(group, key=_row_key):
            key = _row_id(run)
            rows[key].append(run)
            lead[key] = [amount(run), method_name(run)]
        notes = [f"Layout of {layout.paper}; zero-shot {acc_key} in %"]
        notes += [f"perplexity ({d}): " + "; ".join(_protocol_notes(group, d)) for d in names]
        cells = _fill(rows, columns, value, lambda col: "ppl" if col.endswith(" PPL") else "acc", notes)
        tables.append(Table(title=f"{experiment}: {model}, eval={eval_name}", corner="method", rows=list(rows),
                            cols=columns, cells=cells, notes=notes, key=f"paper_{experiment}_{model}_{eval_name}",
                            lead_cols=["Removed", "Method"], lead=lead))
    return tables


def paper_tables(runs: list["Run"], acc_key: str = "acc", datasets: list[str] | None = None,
                 zeroshot: bool = True) -> list[Table]:
    """The tables of every preset among ``runs`` that has a paper layout (none for plain sweeps).

    ``datasets``: the perplexity datasets to show (None: all, []: none); ``zeroshot``: the task columns.
    """
    by_experiment: dict[str, list["Run"]] = defaultdict(list)
    for run in runs:
        name = run.config.get("experiment")
        if name in LAYOUTS:
            by_experiment[name].append(run)
    tables: list[Table] = []
    for name, group in sorted(by_experiment.items()):
        layout = LAYOUTS[name]
        tables += models_tables(group, name, layout, datasets) if layout.kind == "models" else \
            metrics_tables(group, name, layout, acc_key, datasets, zeroshot)
    return tables
