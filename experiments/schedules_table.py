"""The README's fine-tuning and schedules table, read from the runs' results.json files.

Rows without fine-tuning come from the CPU-budget pruning table (experiments/results/cpu-budget/runs),
rows with it from the budget's folder under experiments/results/schedules (written by
experiments/run_schedules_table.sh): ``runs`` for the current budget, 131,072 tokens per training
(about 10 minutes on the idle 2-core CPU), ``runs-65k`` for the earlier 65,536. A lottery run gives
three rows: the ticket and its two controls. Writes experiments/results/schedules/table.md (or
table-65k.md) and prints it; a row whose run is missing says so.

    python experiments/schedules_table.py [--budget 131072|65536]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("schedules_table")
ROOT = Path(__file__).resolve().parent / "results"
BASE = "python -m prunelab experiment=cpu-budget"
# tokens per training -> (folder under results/schedules, table file): 128 / 64 steps of 2 x 512 tokens
BUDGETS = {131072: ("runs", "table.md"), 65536: ("runs-65k", "table-65k.md")}


def rows(tokens: int) -> list[tuple[str, str, str]]:
    """(label, run folder relative to ROOT, command overrides) of the table at ``tokens`` per training."""
    folder = f"schedules/{BUDGETS[tokens][0]}"
    budget = "finetune=masked" + ("" if tokens == 65536 else f" finetune.max_tokens={tokens}")
    step = tokens // 4
    return [
        ("dense", "cpu-budget/runs/dense", "method=dense"),
        ("magnitude 50%", "cpu-budget/runs/magnitude_0.5_unstructured_uniform", "method=magnitude sparsity=0.5"),
        ("magnitude 50% + masked FT", f"{folder}/magnitude_0.5_masked", f"method=magnitude sparsity=0.5 {budget}"),
        ("Wanda 50%", "cpu-budget/runs/wanda_0.5_unstructured_uniform", "method=wanda sparsity=0.5"),
        ("Wanda 50% + masked FT", f"{folder}/wanda_0.5_masked", f"method=wanda sparsity=0.5 {budget}"),
        ("SparseGPT 50%", "cpu-budget/runs/sparsegpt_0.5_unstructured_uniform", "method=sparsegpt sparsity=0.5"),
        ("SparseGPT 50% + masked FT", f"{folder}/sparsegpt_0.5_masked", f"method=sparsegpt sparsity=0.5 {budget}"),
        ("magnitude 60%", "cpu-budget/runs/magnitude_0.6_unstructured_uniform", "method=magnitude sparsity=0.6"),
        ("magnitude 60% + masked FT", f"{folder}/magnitude_0.6_masked", f"method=magnitude sparsity=0.6 {budget}"),
        (f"iterative cubic, 4 steps to 60% (4 x {step:,} tokens)", f"{folder}/iterative_magnitude_0.6_cubic4",
         f"method=magnitude sparsity=0.6 schedule=iterative schedule.steps=4 finetune=masked "
         f"finetune.max_tokens={step} finetune.warmup_steps=3"),
        ("lottery", f"{folder}/lottery_magnitude_3x0.2",
         f"method=magnitude schedule=lottery schedule.rounds=3 schedule.rate=0.2 schedule.controls=[random,oneshot] "
         f"{budget}"),
    ]


def _row(label: str, command: str, ppl: float, achieved: float, tokens: int, seconds: float) -> str:
    minutes = f"{seconds / 60:.1f}" if seconds else "–"
    tokens_text = f"{tokens:,}" if tokens else "–"
    return f"| {label} | {100 * achieved:.1f}% | {ppl:.2f} | {tokens_text} | {minutes} | `{command}` |"


def _training(records: list[dict]) -> tuple[int, float]:
    return sum(r["tokens"] for r in records), sum(r["seconds"] for r in records)


def build(tokens: int = 131072) -> str:
    lines = ["| run | achieved sparsity | WikiText-2 PPL | fine-tuning tokens | fine-tuning min | command |",
             "|---|---|---|---|---|---|"]
    for label, folder, overrides in rows(tokens):
        path = ROOT / folder / "results.json"
        if not path.is_file():
            log.warning("%s: no %s yet", label, path)
            lines.append(f"| {label} | | not run yet | | | `{BASE} {overrides}` |")
            continue
        payload = json.loads(path.read_text())
        metrics = payload["metrics"]
        ppl = metrics["perplexity"]["wikitext2"]["ppl"]
        achieved = metrics["size"]["params"]["prunable"]["sparsity"]
        command = f"{BASE} {overrides}"
        schedule = metrics.get("schedule")
        if schedule is None:
            tokens, seconds = _training([metrics["finetune"]]) if "finetune" in metrics else (0, 0.0)
            lines.append(_row(label, command, ppl, achieved, tokens, seconds))
        elif schedule["name"] == "iterative":
            tokens, seconds = _training(schedule["finetune"])
            lines.append(_row(label, command, ppl, achieved, tokens, seconds))
        else:  # lottery: the ticket (its last training is the budget the controls get) and the controls
            last_tokens, last_seconds = _training(schedule["finetune"][-1:])
            all_tokens, _ = _training(schedule["finetune"])
            rounds = len(schedule["finetune"]) - 1
            lines.append(_row(f"lottery ticket, {rounds} rounds at p = {schedule['rate']} (rewind to W_0; "
                              f"{all_tokens:,} tokens over all rounds)", command, ppl, achieved,
                              last_tokens, last_seconds))
            for branch, name in (("random", "random-mask control"), ("oneshot", "one-shot magnitude control")):
                control = schedule.get("controls", {}).get(branch)
                if control is None:
                    continue
                tokens, seconds = _training([control["finetune"]])
                lines.append(_row(f"{name} (same sparsity, from W_0)", "(same run)",
                                  control["evaluation"]["perplexity"]["wikitext2"]["ppl"], control["achieved"],
                                  tokens, seconds))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=131072, choices=sorted(BUDGETS), help="tokens per training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = build(args.budget)
    out = ROOT / "schedules" / BUDGETS[args.budget][1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    log.info("%s\nwritten to %s", table, out)


if __name__ == "__main__":
    main()
