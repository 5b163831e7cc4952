"""notebooks/explore_sweep.ipynb runs top to bottom on a real sweep folder and shows one row per run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the dev extra (nbclient, nbformat, ipykernel)")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore_sweep.ipynb"
CPU_BUDGET = REPO / "experiments" / "results" / "cpu-budget"


def _execute(monkeypatch: pytest.MonkeyPatch, sweep: Path | None) -> list:
    """Run the notebook in a fresh kernel (cwd: notebooks/), with PRUNELAB_SWEEP set or unset; return its cells."""
    if sweep is None:
        monkeypatch.delenv("PRUNELAB_SWEEP", raising=False)
    else:
        monkeypatch.setenv("PRUNELAB_SWEEP", str(sweep))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook.cells


def _text(cell) -> str:
    """Everything a code cell printed or displayed, as plain text and HTML."""
    parts = []
    for output in cell.get("outputs", []):
        assert output["output_type"] != "error", output
        parts.append(output.get("text", ""))
        data = output.get("data", {})
        parts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(parts)


def _body_rows(text: str) -> int:
    """Rows of the (first) HTML table in ``text``, header excluded."""
    return text.split("<tbody>", 1)[1].split("</tbody>", 1)[0].count("<tr")


def test_first_cell_tells_how_to_install_and_choose_a_folder() -> None:
    first = nbformat.read(NOTEBOOK, as_version=4).cells[0]
    assert first.cell_type == "markdown"
    for needed in ('pip install -c constraints.txt -e ".[notebook]"', "PRUNELAB_SWEEP", "experiments/results/cpu-budget"):
        assert needed in first.source


def test_default_folder_gives_one_row_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {path.parent.name: json.loads(path.read_text()) for path in CPU_BUDGET.rglob("results.json")}
    assert len(expected) == 22
    cells = _execute(monkeypatch, None)
    table = _text(cells[1])
    assert f"{len(expected)} complete runs, 0 incomplete, 0 never launched" in table
    assert _body_rows(table) == len(expected)
    for name, results in expected.items():
        assert f"runs/{name}" in table
        assert f"{results['metrics']['perplexity']['wikitext2']['ppl']:.6f}" in table  # pandas' 6 decimals
    assert "image/png" in cells[4]["outputs"][-1]["data"]


def test_sweep_from_the_environment_lists_failed_and_never_launched_jobs(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for num, name in enumerate(("dense", "wanda_0.5_unstructured_uniform")):
        job = sweep / f"{num}_{name}"
        (job / ".hydra").mkdir(parents=True)
        shutil.copy(CPU_BUDGET / "runs" / name / "results.json", job / "results.json")
        (job / ".hydra" / "overrides.yaml").write_text(f"- method={name.split('_')[0]}\n")
    failed = sweep / "2_sparsegpt"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- method=sparsegpt\n")
    (failed / "failed.json").write_text(json.dumps({"status": "failed", "phase": "prune", "error": "RuntimeError: boom"}))
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "  overrides:\n    task:\n    - method=dense,wanda,sparsegpt,magnitude\n")

    cells = _execute(monkeypatch, sweep)
    table = _text(cells[1])
    assert "2 complete runs, 1 incomplete, 1 never launched" in table
    assert _body_rows(table) == 2
    problems = _text(cells[3])
    assert "failed during prune: RuntimeError: boom" in problems and "method=sparsegpt" in problems
    assert "job #3" in problems and "never launched" in problems and "method=magnitude" in problems
