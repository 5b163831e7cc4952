"""The sweep report on a synthetic Hydra multirun folder whose numbers are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelab.report import build_report, collect_runs
from prunelab.report.__main__ import main

FP = "sha256:" + "ab" * 32


def _results(method: str, sparsity: float, pattern: str, ppl: dict[str, float], allocation: str = "uniform",
             seed: int = 0, tasks: dict[str, float] | None = None, per_layer: list[float] | None = None) -> dict:
    metrics: dict = {"perplexity": {d: {"ppl": v, "seqlen": 2048, "windows": 8, "tokens": 16384, "fingerprint": FP}
                                    for d, v in ppl.items()}}
    if tasks is not None:
        metrics["zeroshot"] = {"tasks": {t: {"acc": a, "acc_norm": a + 0.01} for t, a in tasks.items()},
                               "mean_acc": sum(tasks.values()) / len(tasks)}
    if per_layer is not None:
        metrics["sparsity"] = {"overall": sum(per_layer) / len(per_layer),
                               "per_layer": {str(i): v for i, v in enumerate(per_layer)}}
    return {
        "status": "complete",
        "run_dir": "unused",
        "config": {"model": {"name": "tiny"}, "method": {"name": method, "params": {}},
                   "allocation": {"name": allocation}, "sparsity": sparsity, "pattern": pattern,
                   "calib": {"nsamples": 16}, "eval": {"name": "quick"}, "seed": seed, "tags": []},
        "metrics": metrics,
        "timings": {"load_s": 1.0, "prune_s": 2.0, "eval_s": 3.0},
    }


def _job(root: Path, name: str, results: dict | None = None, failed: dict | None = None,
         overrides: list[str] | None = None) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides or []))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    if failed is not None:
        (job / "failed.json").write_text(json.dumps(failed))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    tasks = {"arc_easy": 0.60, "boolq": 0.70}
    _job(root, "0", _results("dense", 0.5, "unstructured", {"wikitext2": 20.00, "c4": 25.00}, tasks=tasks))
    _job(root, "1", _results("magnitude", 0.5, "unstructured", {"wikitext2": 31.25, "c4": 40.5},
                             per_layer=[0.5, 0.5, 0.5]))
    _job(root, "2", _results("wanda", 0.5, "unstructured", {"wikitext2": 22.50, "c4": 28.0},
                             tasks={"arc_easy": 0.55, "boolq": 0.65}))
    _job(root, "3", _results("wanda", 0.7, "unstructured", {"wikitext2": 80.00}))
    _job(root, "4", _results("wanda", 0.7, "unstructured", {"wikitext2": 60.00}, allocation="owl",
                             per_layer=[0.62, 0.7, 0.78]))
    _job(root, "5", _results("wanda", 0.5, "2:4", {"wikitext2": 35.00}))
    _job(root, "6", _results("wanda", 0.5, "2:4", {"wikitext2": 37.00}, seed=1))  # averaged with job 5
    _job(root, "7", failed={"error": "Traceback ...\nRuntimeError: CUDA out of memory"},
         overrides=["method=sparsegpt", "sparsity=0.7"])
    _job(root, "8", overrides=["method=sparsegpt", "sparsity=0.8"])  # killed: no results at all
    running = _results("sparsegpt", 0.6, "unstructured", {"wikitext2": 1.0})
    running["status"] = "running"
    _job(root, "9", running)
    return root


def _table(markdown: str, heading_part: str) -> dict[str, dict[str, str]]:
    """Parse the Markdown table under the first heading containing ``heading_part``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### ") and heading_part in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("### ") or line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|:"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[1:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def test_collect_separates_complete_and_incomplete(sweep: Path) -> None:
    runs, incomplete = collect_runs(sweep)
    assert sorted(run.name for run in runs) == [str(i) for i in range(7)]
    reasons = {item.name: item.reason for item in incomplete}
    assert set(reasons) == {"7", "8", "9"}
    assert "CUDA out of memory" in reasons["7"] and reasons["7"].startswith("failed")
    assert "no results.json" in reasons["8"]
    assert "running" in reasons["9"]


def test_markdown_table_cells(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = build_report(sweep, out)
    markdown = result["markdown"].read_text()

    wiki = _table(markdown, "Perplexity (wikitext2)")
    assert list(wiki) == ["dense", "magnitude", "wanda", "wanda + owl"]  # papers' row order, allocation shown
    assert wiki["dense"]["0% (dense)"] == "20.00"
    assert wiki["magnitude"]["50%"] == "31.25"
    assert wiki["wanda"]["50%"] == "22.50"
    assert wiki["wanda"]["70%"] == "80.00"
    assert wiki["wanda + owl"]["70%"] == "60.00"
    assert wiki["wanda"]["2:4"].startswith("36.00 ± 1.41 (n=2)")  # mean and sample std of 35 and 37
    assert wiki["magnitude"]["70%"] == "–"
    assert list(wiki["dense"]) == ["0% (dense)", "50%", "70%", "2:4"]

    assert "configs differ" not in markdown and "different perplexity protocols" not in markdown

    c4 = _table(markdown, "Perplexity (c4)")
    assert c4["magnitude"]["50%"] == "40.50" and c4["wanda"]["50%"] == "28.00"
    assert "seqlen 2048, 8 windows" in markdown

    mean = _table(markdown, "Zero-shot mean accuracy")
    assert mean["dense"]["0% (dense)"] == "65.00" and mean["wanda"]["50%"] == "60.00"
    per_task = _table(markdown, "Zero-shot accuracy per task")
    assert per_task["wanda @ 50%"] == {"arc_easy": "55.00", "boolq": "65.00", "mean": "60.00"}

    section = markdown.split("## Incomplete runs", 1)[1]
    for name in ("`7`", "`8`", "`9`"):
        assert name in section
    assert "method=sparsegpt sparsity=0.8" in section
    assert "CUDA out of memory" in section

    latex = result["latex"].read_text()
    assert r"\toprule" in latex and "31.25" in latex and r"50\%" in latex and r"$\pm$" in latex
    assert {p.name for p in result["plots"]} == {"ppl_c4_tiny.png", "ppl_wikitext2_tiny.png", "layer_sparsity_tiny.png"}
    for path in result["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metric_selection_and_log(sweep: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "only_wiki"
    with caplog.at_level("WARNING"):
        assert main([str(sweep), "--metric", "ppl:wikitext2", "--out", str(out), "--no-plots"]) == 0
    markdown = (out / "report.md").read_text()
    assert "Perplexity (wikitext2)" in markdown
    assert "Perplexity (c4)" not in markdown and "Zero-shot" not in markdown
    logged = caplog.text
    for name in ("7", "8", "9"):
        assert f"incomplete run {name}:" in logged


def test_mixed_protocols_are_flagged(sweep: Path, tmp_path: Path) -> None:
    results_path = sweep / "3" / "results.json"
    results = json.loads(results_path.read_text())
    results["metrics"]["perplexity"]["wikitext2"]["seqlen"] = 128
    results_path.write_text(json.dumps(results))
    markdown = build_report(sweep, tmp_path / "r", ["ppl:wikitext2"], plots=False)["markdown"].read_text()
    assert "different perplexity protocols" in markdown


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        collect_runs(tmp_path / "missing")
    with pytest.raises(ValueError, match="ppl:<dataset>"):
        build_report(tmp_path, metrics=["perplexity"])


def test_cell_merging_different_configs_is_flagged(sweep: Path, tmp_path: Path) -> None:
    results_path = sweep / "6" / "results.json"  # the seed-1 twin of job 5, now also with other calibration
    results = json.loads(results_path.read_text())
    results["config"]["calib"]["nsamples"] = 128
    results_path.write_text(json.dumps(results))
    markdown = build_report(sweep, tmp_path / "r", ["ppl:wikitext2"], plots=False)["markdown"].read_text()
    assert "wanda @ 2:4 averages runs whose configs differ in calib.nsamples (5, 6)" in markdown
    assert "differ in seed" not in markdown


def test_layer_sparsity_panels_group_by_method_and_name_repeats(tmp_path: Path) -> None:
    from prunelab.report import Run
    from prunelab.report.plots import layer_sparsity_panels, plot_layer_sparsity

    runs = [
        Run("a", _results("wanda", 0.7, "unstructured", {}, allocation="owl", per_layer=[0.6, 0.8])),
        Run("b", _results("sparsegpt", 0.5, "2:4", {}, per_layer=[0.5, 0.5])),
        Run("c", _results("wanda", 0.5, "unstructured", {}, per_layer=[0.5, 0.5])),
        Run("d", _results("wanda", 0.7, "unstructured", {}, per_layer=[0.7, 0.7])),
        Run("e", _results("magnitude", 0.5, "unstructured", {}, seed=0, per_layer=[0.5, 0.5])),
        Run("f", _results("magnitude", 0.5, "unstructured", {}, seed=1, per_layer=[0.5, 0.5])),
    ]
    panels = layer_sparsity_panels(runs)
    # Panels in the tables' method order; inside one, targets ascending and uniform before OWL.
    assert list(panels) == ["magnitude", "sparsegpt", "wanda"]
    assert [(label, run.name) for label, run in panels["wanda"]] == [("50%", "c"), ("70%", "d"), ("70% + owl", "a")]
    assert [label for label, _ in panels["sparsegpt"]] == ["2:4"]
    # Two seeds of one cell would share a legend entry: the folder tells them apart.
    assert [label for label, _ in panels["magnitude"]] == ["50% (e)", "50% (f)"]
    out = plot_layer_sparsity(runs, "t", tmp_path / "layers.png")
    assert out is not None and out.stat().st_size > 0
    assert plot_layer_sparsity([Run("g", _results("dense", 0.0, "unstructured", {}))], "t", tmp_path / "x.png") is None
