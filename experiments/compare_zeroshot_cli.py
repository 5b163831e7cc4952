"""Compare a prunelab run's zero-shot numbers with lm-eval's own command line on the same data.

Reads ``results.json`` of a prunelab run (``metrics.zeroshot``) and the ``results_*.json`` that
``lm_eval run ... --output_path DIR`` wrote, matches tasks (``arc_easy`` ↔ ``arc_easy_offline``),
checks that both evaluated the same number of documents, and prints a Markdown table of acc,
acc_norm and perplexity side by side with the largest difference in points. Exits 1 when an
accuracy differs by more than ``--tolerance`` points or the document counts differ.

Example (see experiments/zeroshot_cli.md for the two runs)::

    python experiments/compare_zeroshot_cli.py outputs/<run>/results.json outputs/lm_eval_cli \
        --out experiments/results/zeroshot/cli_comparison.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("compare_zeroshot_cli")
ACCURACIES = ("acc", "acc_norm")


def cli_results(path: Path) -> dict[str, Any]:
    """The newest ``results_*.json`` at ``path`` (a file, or a folder searched recursively)."""
    if path.is_file():
        return json.loads(path.read_text())
    files = sorted(path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no lm-eval results_*.json under {path}; give lm_eval's --output_path folder")
    return json.loads(files[-1].read_text())


def compare(prunelab: dict[str, Any], cli: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows ``{task, metric, prunelab, cli, diff_points}`` and a list of problems (empty when they agree)."""
    tasks = prunelab["metrics"]["zeroshot"]["tasks"]
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for name, ours in tasks.items():
        harness = ours.get("harness_task", name)
        theirs = cli["results"].get(harness)
        if theirs is None:
            problems.append(f"{name}: the CLI results have no task {harness!r}")
            continue
        counts = cli.get("n-samples", {}).get(harness, {})
        if counts.get("effective") is not None and counts["effective"] != ours.get("n_docs"):
            problems.append(f"{name}: {ours.get('n_docs')} documents here, {counts['effective']} in the CLI run")
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric not in ours or f"{metric},none" not in theirs:
                continue
            a, b = float(ours[metric]), float(theirs[f"{metric},none"])
            diff = 100 * abs(a - b) if metric in ACCURACIES else abs(a - b)
            rows.append({"task": name, "metric": metric, "prunelab": a, "cli": b, "diff": diff})
    return rows, problems


def markdown(rows: list[dict[str, Any]], n_docs: dict[str, int]) -> str:
    lines = ["| task | docs | metric | prunelab `run_zeroshot` | `lm_eval run` | difference |",
             "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        unit = " points" if row["metric"] in ACCURACIES else ""
        lines.append(f"| {row['task']} | {n_docs.get(row['task'], '')} | {row['metric']} | {row['prunelab']:.4f} | "
                     f"{row['cli']:.4f} | {row['diff']:.2f}{unit} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a prunelab results.json with metrics.zeroshot")
    parser.add_argument("cli", type=Path, help="lm-eval's --output_path folder (or one results_*.json)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="largest accepted accuracy difference, points")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ours = json.loads(args.results.read_text())
    if ours.get("status") != "complete" or "zeroshot" not in ours.get("metrics", {}):
        log.error("%s is not a complete prunelab run with zero-shot metrics", args.results)
        return 1
    rows, problems = compare(ours, cli_results(args.cli))
    n_docs = {name: task.get("n_docs") for name, task in ours["metrics"]["zeroshot"]["tasks"].items()}
    table = markdown(rows, n_docs)
    worst = max((r["diff"] for r in rows if r["metric"] in ACCURACIES), default=float("nan"))
    sys.stdout.write(table)
    log.info("largest accuracy difference: %.2f points (tolerance %.2f)", worst, args.tolerance)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    if not rows:
        problems.append("no metric is present in both results")
    if rows and worst > args.tolerance:
        problems.append(f"accuracies differ by up to {worst:.2f} points (> {args.tolerance})")
    for problem in problems:
        log.error(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
