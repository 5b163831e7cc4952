"""experiments/compare_zeroshot_cli.py: matches tasks, flags differences and document-count mismatches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "compare_zeroshot_cli.py"
spec = importlib.util.spec_from_file_location("compare_zeroshot_cli", SCRIPT)
compare_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_cli)


def _ours(acc: float, n_docs: int = 500) -> dict:
    tasks = {
        "arc_easy": {"harness_task": "arc_easy_offline", "acc": acc, "acc_norm": 0.5, "n_docs": n_docs},
        "lambada_openai": {"harness_task": "lambada_openai_offline", "acc": 0.3, "perplexity": 40.0, "n_docs": n_docs},
    }
    return {"status": "complete", "metrics": {"zeroshot": {"tasks": tasks}}}


def _cli(tmp_path: Path, effective: int = 500) -> Path:
    folder = tmp_path / "cli" / "model_name"
    folder.mkdir(parents=True)
    results = {
        "results": {
            "arc_easy_offline": {"acc,none": 0.6, "acc_norm,none": 0.5},
            "lambada_openai_offline": {"acc,none": 0.3, "perplexity,none": 40.0},
        },
        "n-samples": {"arc_easy_offline": {"original": 2376, "effective": effective},
                      "lambada_openai_offline": {"original": 5153, "effective": effective}},
    }
    (folder / "results_2026-11-22T00-00-00.json").write_text(json.dumps(results))
    return tmp_path / "cli"


def _run(tmp_path: Path, ours: dict, cli: Path, *extra: str) -> int:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(ours))
    return compare_cli.main([str(path), str(cli), "--out", str(tmp_path / "table.md"), *extra])


def test_equal_numbers_pass_and_the_table_lists_every_metric(tmp_path):
    assert _run(tmp_path, _ours(0.6), _cli(tmp_path)) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + 4  # header, rule, arc_easy acc and acc_norm, lambada acc and perplexity
    assert "| arc_easy | 500 | acc | 0.6000 | 0.6000 | 0.00 points |" in table


def test_a_difference_above_the_tolerance_fails(tmp_path):
    cli = _cli(tmp_path)
    assert _run(tmp_path, _ours(0.597), cli) == 0  # 0.3 points
    assert _run(tmp_path, _ours(0.594), cli) == 1  # 0.6 points > 0.5
    assert _run(tmp_path, _ours(0.594), cli, "--tolerance", "1") == 0


def test_different_document_counts_fail(tmp_path):
    assert _run(tmp_path, _ours(0.6, n_docs=500), _cli(tmp_path, effective=400)) == 1
