"""The sweep report on synthetic Hydra multirun folders whose numbers and grids are known (and one real multirun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab.report import build_report, collect_runs
from prunelab.report.__main__ import main
from prunelab.report.grid import check_grids

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


# ------------------------------------------------------------------------------ failed and never-launched jobs
def _multirun_yaml(sweep: Path, task: list[str], sweeper: str = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                   params: dict | None = None) -> None:
    """What Hydra's basic sweeper saves before launching (only the keys the report reads, plus an unresolvable one)."""
    from omegaconf import OmegaConf

    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({
        "hydra": {"sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}_${method.name}_${sparsity}"},
                  "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
                  "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}},
        "sparsity": 0.5, "data_root": "${oc.env:NO_SUCH_VARIABLE_FOR_THE_REPORT}",
    }), sweep / "multirun.yaml")


@pytest.fixture
def killed_sweep(tmp_path: Path) -> Path:
    """A 2 x 2 grid (+ a fixed override) killed after two jobs: one complete, one failed, two never launched."""
    root = tmp_path / "killed"
    _multirun_yaml(root, ["method=magnitude,wanda", "sparsity=0.3,0.5", "logger=none"])
    _job(root, "0_magnitude_0.3", _results("magnitude", 0.3, "unstructured", {"wikitext2": 25.0}),
         overrides=["method=magnitude", "sparsity=0.3", "logger=none"])
    _job(root, "1_magnitude_0.5", overrides=["method=magnitude", "sparsity=0.5", "logger=none"],
         failed={"status": "failed", "phase": "prune", "error": "RuntimeError: N:M check failed after pruning",
                 "traceback": ["Traceback (most recent call last):\n", "RuntimeError: N:M check failed\n"]})
    return root


def test_failed_job_shows_its_phase_error_and_overrides(killed_sweep: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        markdown = build_report(killed_sweep, tmp_path / "r", plots=False)["markdown"].read_text()
    section = markdown.split("## Incomplete runs", 1)[1].split("## Never launched", 1)[0]
    line = next(line for line in section.splitlines() if "1_magnitude_0.5" in line)
    assert "failed during prune: RuntimeError: N:M check failed after pruning" in line
    assert "method=magnitude sparsity=0.5 logger=none" in line
    assert "incomplete run 1_magnitude_0.5: failed during prune" in caplog.text


def test_never_launched_jobs_of_the_grid_are_listed(killed_sweep: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        result = build_report(killed_sweep, tmp_path / "r", plots=False)
    # Hydra numbers jobs in the order of the cartesian product, the last override varying fastest.
    assert [(job.num, job.overrides) for job in result["never_launched"]] == [
        (2, ("method=wanda", "sparsity=0.3", "logger=none")),
        (3, ("method=wanda", "sparsity=0.5", "logger=none")),
    ]
    markdown = result["markdown"].read_text()
    assert "1 complete runs, 1 incomplete, 2 never launched." in markdown
    section = markdown.split("## Never launched", 1)[1]
    assert "job #2 — `method=wanda sparsity=0.3 logger=none`" in section
    assert "job #3 — `method=wanda sparsity=0.5 logger=none`" in section
    assert "job #2: never launched [method=wanda sparsity=0.3 logger=none]" in caplog.text


def test_override_order_does_not_matter_and_every_launched_job_counts(killed_sweep: Path) -> None:
    _job(killed_sweep, "2_wanda_0.3", overrides=["logger=none", "sparsity=0.3", "method=wanda"])  # killed mid-run
    _job(killed_sweep, "3_wanda_0.5", _results("wanda", 0.5, "unstructured", {"wikitext2": 30.0}),
         overrides=["method=wanda", "sparsity=0.5", "logger=none"])
    grids = check_grids(killed_sweep)
    assert grids.checked == ["."] and grids.never_launched == []


def test_parent_folder_of_several_sweeps_and_plain_runs(killed_sweep: Path, tmp_path: Path) -> None:
    complete = tmp_path / "other"  # a second sweep beside the first, all jobs launched
    _multirun_yaml(complete, ["seed=range(0,2)", "method=dense"], params={"logger": "none"})
    for num in range(2):
        _job(complete, str(num), _results("dense", 0.0, "unstructured", {"wikitext2": 20.0}, seed=num),
             overrides=["logger=none", f"seed={num}", "method=dense"])
    (tmp_path / "single").mkdir()  # a single run (no sweep) beside them
    (tmp_path / "single" / "results.json").write_text(json.dumps(_results("wanda", 0.5, "unstructured", {"wikitext2": 22.0})))

    result = build_report(tmp_path, tmp_path / "r", plots=False)
    assert [job.label for job in result["never_launched"]] == ["killed job #2", "killed job #3"]
    assert result["runs"] == 4 and result["incomplete"] == ["killed/1_magnitude_0.5"]
    assert "- killed job #3 — `method=wanda sparsity=0.5 logger=none`" in result["markdown"].read_text()


def test_grids_that_cannot_be_expanded_are_named_not_fatal(tmp_path: Path) -> None:
    _multirun_yaml(tmp_path / "optuna", ["sparsity=interval(0.3,0.7)"], sweeper="hydra_plugins.optuna.OptunaSweeper")
    _multirun_yaml(tmp_path / "glob", ["method=glob(*)"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "multirun.yaml").write_text("hydra: [unclosed\n")
    markdown = build_report(tmp_path, tmp_path / "r", plots=False)["markdown"].read_text()
    section = markdown.split("## Never launched", 1)[1]
    for sweep in ("optuna", "glob", "broken"):
        assert f"- `{sweep}`: grid not checked" in section


def test_folder_without_multirun_yaml_says_the_grid_is_unknown(sweep: Path, tmp_path: Path) -> None:
    result = build_report(sweep, tmp_path / "r", plots=False)
    assert result["never_launched"] == []
    assert "No `multirun.yaml` below this folder" in result["markdown"].read_text()


def test_a_real_multirun_killed_before_its_last_job(tmp_path: Path) -> None:
    """Hydra writes multirun.yaml and the job folders itself; jobs fail at once on a data root without files."""
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PRUNELAB_DATA=str(tmp_path / "empty-data"), PRUNELAB_CACHE=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_SILENT="true")
    subprocess.run([sys.executable, "-m", "prunelab", "-m", "method=magnitude", "sparsity=0.3,0.5", "logger=none",
                    "tags=[a,b]", f"hydra.sweep.dir={sweep}"], cwd=Path(__file__).resolve().parents[1], env=env,
                   capture_output=True, text=True, timeout=300)
    assert (sweep / "multirun.yaml").is_file()
    for job in sweep.glob("1_*"):  # as if the sweep was killed before job 1 started
        shutil.rmtree(job)
    result = build_report(sweep, tmp_path / "r", plots=False)
    assert [(job.num, job.overrides) for job in result["never_launched"]] == [
        (1, ("method=magnitude", "sparsity=0.5", "logger=none", "tags=[a,b]"))]
    assert [name.split("_")[0] for name in result["incomplete"]] == ["0"]


def test_partial_split_is_noted_from_full_split_or_the_older_complete_key(sweep: Path, tmp_path: Path) -> None:
    def rewrite(job: str, **entry) -> None:
        path = sweep / job / "results.json"
        results = json.loads(path.read_text())
        results["metrics"]["perplexity"]["wikitext2"].update(entry)
        path.write_text(json.dumps(results))

    for job in ("0", "1", "2", "3", "4", "5", "6"):
        rewrite(job, full_split=True)
    markdown = build_report(sweep, tmp_path / "a", ["ppl:wikitext2"], plots=False)["markdown"].read_text()
    assert "not the full split" not in markdown
    rewrite("3", full_split=False)
    markdown = build_report(sweep, tmp_path / "b", ["ppl:wikitext2"], plots=False)["markdown"].read_text()
    assert "seqlen 2048, 8 windows (not the full split)" in markdown
    path = sweep / "3" / "results.json"  # a results.json written before the rename: "complete" only
    results = json.loads(path.read_text())
    del results["metrics"]["perplexity"]["wikitext2"]["full_split"]
    results["metrics"]["perplexity"]["wikitext2"]["complete"] = False
    path.write_text(json.dumps(results))
    markdown = build_report(sweep, tmp_path / "c", ["ppl:wikitext2"], plots=False)["markdown"].read_text()
    assert "seqlen 2048, 8 windows (not the full split)" in markdown
    assert "different perplexity protocols" not in markdown


def test_runs_that_differ_in_schedule_finetuning_or_structure_get_their_own_rows():
    from prunelab.report import Run
    from prunelab.report.tables import col_label, col_sort_key, row_label

    def run(**config):
        base = {"method": {"name": "magnitude"}, "allocation": {"name": "uniform"}, "sparsity": 0.5,
                "pattern": "unstructured", "schedule": {"name": "oneshot"}, "finetune": {"name": "none"}}
        return Run("r", {"config": {**base, **config}})

    assert row_label(run()) == "magnitude"
    assert row_label(run(finetune={"name": "masked"})) == "magnitude + masked FT"
    lottery = run(schedule={"name": "lottery", "rate": 0.2, "rounds": 3}, finetune={"name": "masked"})
    assert row_label(lottery) == "magnitude + lottery + masked FT" and col_label(lottery) == "48.8%"
    neurons = run(method={"name": "dense"}, structure={"name": "neurons", "score": "flap", "fraction": 0.2})
    layers = run(method={"name": "dense"}, structure={"name": "layers", "score": "last", "count": 4})
    assert (row_label(neurons), col_label(neurons)) == ("neurons (flap)", "20% neurons")
    assert (row_label(layers), col_label(layers)) == ("layers (last)", "4 layers")
    assert sorted(["4 layers", "50%", "2:4", "20% neurons"], key=col_sort_key) == ["50%", "2:4", "4 layers", "20% neurons"]


# ------------------------------------------------------------------------------------- paper layouts
def _rows(markdown: str, heading_part: str) -> list[dict[str, str]]:
    """The rows (header → cell, in order) of the Markdown table under the first heading containing ``heading_part``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### ") and heading_part in line)
    table = []
    for line in lines[start + 1:]:
        if line.startswith(("### ", "## ")):
            break
        if line.startswith("|") and not line.startswith("|:"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [dict(zip(table[0], row)) for row in table[1:]]


def _paper_run(experiment: str, model: str, method: str, ppl: float, sparsity: float = 0.5, pattern: str = "unstructured",
               allocation: str = "uniform", seed: int = 0, tasks: dict[str, float] | None = None,
               structure: dict | None = None, task_order: list[str] | None = None) -> dict:
    results = _results(method, sparsity, pattern, {"wikitext2": ppl}, allocation=allocation, seed=seed, tasks=tasks)
    results["config"].update(experiment=experiment, model={"name": model}, calib={"nsamples": 16, "seed": seed})
    if structure is not None:
        results["config"]["structure"] = structure
    if task_order is not None:
        results["config"]["eval"]["zeroshot"] = {"tasks": task_order}
    return results


def test_sparsegpt_preset_is_laid_out_like_the_paper(tmp_path: Path) -> None:
    """Rows (method, sparsity) grouped by sparsity with dense first, one column per model, seeds as mean ± std."""
    root = tmp_path / "multirun" / "sparsegpt-table"
    jobs = [("a", "dense", 20.0, 0.5, "unstructured", 0), ("a", "magnitude", 40.0, 0.5, "unstructured", 0),
            ("a", "sparsegpt", 30.0, 0.5, "unstructured", 0), ("a", "sparsegpt", 32.0, 0.5, "unstructured", 1),
            ("a", "sparsegpt", 36.0, 0.5, "2:4", 0), ("a", "magnitude", 90.0, 0.5, "2:4", 0),
            ("b", "dense", 10.0, 0.5, "unstructured", 0), ("b", "sparsegpt", 15.0, 0.5, "unstructured", 0),
            ("a", "random", 99.0, 0.5, "unstructured", 0)]
    for i, (model, method, ppl, sparsity, pattern, seed) in enumerate(jobs):
        _job(root / model, str(i), _paper_run("sparsegpt-table", model, method, ppl, sparsity, pattern, seed=seed))
    _job(root, "plain", _results("wanda", 0.5, "unstructured", {"wikitext2": 25.0}))  # no preset: sweep tables only
    markdown = build_report(root, tmp_path / "report", plots=False)["markdown"].read_text()

    rows = _rows(markdown, "sparsegpt-table: wikitext2 perplexity")
    assert [(r["Method"], r["Sparsity"]) for r in rows] == [
        ("Dense", "0%"), ("Random", "50%"), ("Magnitude", "50%"), ("SparseGPT", "50%"), ("Magnitude", "2:4"),
        ("SparseGPT", "2:4")]  # the papers' method order, not the alphabet
    assert list(rows[0]) == ["Method", "Sparsity", "a", "b"]
    assert rows[0]["a"] == "20.00" and rows[0]["b"] == "10.00"
    assert rows[3]["a"] == "31.00 ± 1.41 (n=2)" and rows[3]["b"] == "15.00"
    assert rows[2]["b"] == "–" and rows[4]["a"] == "90.00"
    assert "Layout of SparseGPT (Frantar & Alistarh 2023)" in markdown
    paper_part = markdown.split("### Perplexity (wikitext2)")[0]
    assert "| tiny" not in paper_part and "25.00" not in paper_part, "a run of no preset has no paper table"
    assert "### Perplexity (wikitext2) — a" in markdown, "the sweep tables are still written"


def test_wanda_preset_has_the_weight_update_column(tmp_path: Path) -> None:
    root = tmp_path / "wanda-table"
    for i, method in enumerate(("dense", "magnitude", "wanda", "sparsegpt")):
        _job(root, str(i), _paper_run("wanda-table", "m", method, 10.0 + i))
    rows = _rows(build_report(root, tmp_path / "r", plots=False)["markdown"].read_text(), "wanda-table:")
    assert [(r["Method"], r["Weight update"], r["Sparsity"], r["m"]) for r in rows] == [
        ("Dense", "–", "0%", "10.00"), ("Magnitude", "✗", "50%", "11.00"), ("SparseGPT", "✓", "50%", "13.00"),
        ("Wanda", "✗", "50%", "12.00")]


def test_structured_preset_puts_metrics_in_columns(tmp_path: Path) -> None:
    """LLM-Pruner / FLAP: rows (removed, method), columns perplexity, each task in the preset's order, average."""
    root = tmp_path / "structured-table"
    order = ["piqa", "boolq"]
    _job(root, "0", _paper_run("structured-table", "m", "dense", 20.0, tasks={"boolq": 0.70, "piqa": 0.60}, task_order=order))
    for i, (score, ppl, boolq) in enumerate((("flap", 30.0, 0.62), ("magnitude", 50.0, 0.58))):
        _job(root, str(i + 1), _paper_run("structured-table", "m", "magnitude", ppl, tasks={"boolq": boolq, "piqa": 0.50},
                                          structure={"name": "neurons", "score": score, "fraction": 0.3}, task_order=order))
    tuned = _paper_run("structured-table", "m", "magnitude", 25.0, tasks={"boolq": 0.66, "piqa": 0.50},
                       structure={"name": "neurons", "score": "flap", "fraction": 0.3}, task_order=order)
    tuned["config"]["finetune"] = {"name": "lora"}  # LLM-Pruner's "w/ tune" row: its own row, not a seed of "w/o"
    _job(root, "3", tuned)
    rows = _rows(build_report(root, tmp_path / "r", plots=False)["markdown"].read_text(), "structured-table: m")
    assert list(rows[0]) == ["Removed", "Method", "wikitext2 PPL", "piqa", "boolq", "Average"]
    assert rows[0] == {"Removed": "0%", "Method": "Dense", "wikitext2 PPL": "20.00", "piqa": "60.00", "boolq": "70.00",
                       "Average": "65.00"}
    assert [(r["Removed"], r["Method"], r["wikitext2 PPL"], r["boolq"], r["Average"]) for r in rows[1:]] == [
        ("30% neurons", "neurons (flap)", "30.00", "62.00", "56.00"),
        ("30% neurons", "neurons (flap) + lora FT", "25.00", "66.00", "58.00"),
        ("30% neurons", "neurons (magnitude)", "50.00", "58.00", "54.00")]


def _hydra_node(task: list[str], sweeper: str = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper") -> dict:
    """The part of an invocation's ``hydra`` config node the sweep summary reads."""
    return {"sweeper": {"_target_": sweeper, "params": None}, "overrides": {"task": task}}


def test_the_sweep_summary_judges_only_the_jobs_of_the_ending_invocation(killed_sweep: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from prunelab.tracking.sweep import summarize

    wide = _hydra_node(["method=magnitude,wanda", "sparsity=0.3,0.5", "logger=none"])
    failed = summarize(killed_sweep, wide)  # the invocation that failed job 1: it counts
    assert len(failed) == 1 and "1_magnitude_0.5" in failed[0] and "failed during prune" in failed[0]
    # a narrowed re-run into the same folder: only magnitude 0.3, complete. The folder's multirun.yaml
    # still names the wide grid (another invocation may write it at any time): the callback's own config decides
    narrow = _hydra_node(["method=magnitude", "sparsity=0.3", "logger=none"])
    with caplog.at_level("INFO", logger="prunelab.tracking.sweep"):
        assert summarize(killed_sweep, narrow) == []
    assert "not this invocation's job, not counted: 1_magnitude_0.5" in caplog.text
    assert "1 jobs, 1 complete, 0 not" in caplog.text
    # a search sweeper plans no fixed grid (Optuna writes no multirun.yaml): every folder counts
    assert len(summarize(killed_sweep, _hydra_node(["method=magnitude"], "hydra_plugins.hydra_optuna_sweeper.OptunaSweeper"))) == 1
    assert len(summarize(killed_sweep)) == 1  # no invocation given (the report's view): every folder counts


def test_a_failed_job_retried_under_another_job_number_no_longer_fails_the_sweep(killed_sweep: Path) -> None:
    from prunelab.tracking.sweep import summarize

    retry = ["method=magnitude", "sparsity=0.5", "logger=none"]
    node = _hydra_node(retry)
    assert len(summarize(killed_sweep, node)) == 1  # the failed folder is this grid's only job so far
    old = killed_sweep / "1_magnitude_0.5" / ".hydra" / "overrides.yaml"
    os.utime(old, (old.stat().st_mtime - 60, old.stat().st_mtime - 60))
    _job(killed_sweep, "0_magnitude_0.5", _results("magnitude", 0.5, "unstructured", {"wikitext2": 30.0}), overrides=retry)
    assert summarize(killed_sweep, node) == []  # the newer folder of the same overrides completed
    newer = killed_sweep / "0_magnitude_0.5" / ".hydra" / "overrides.yaml"
    os.utime(newer, (old.stat().st_mtime - 60, old.stat().st_mtime - 60))  # now the failure is the newer one
    assert len(summarize(killed_sweep, node)) == 1
