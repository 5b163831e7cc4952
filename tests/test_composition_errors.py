"""What Hydra cannot compose is answered like prunelab's own refusals: one line, exit 2, no run folder
(issue #21, items 2 and 11)."""

from __future__ import annotations

import pytest

from test_run_safety import run_cli


@pytest.mark.parametrize("override,expected", [
    ("experiment=cpu-budgt", "experiment=cpu-budgt: no such option; choose one of cpu-budget, cpu-budget-table"),
    ("method=foo", "method=foo: no such option; choose one of dense, magnitude, random, sparsegpt, wanda"),
    ("sparsity=abc", "sparsity=abc; Value 'abc' of type 'str' could not be converted to Float"),
])
def test_a_value_hydra_cannot_compose_is_one_line_and_exit_2(tmp_path, override, expected):
    proc = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}", cache_dir=tmp_path / "cache", data_root=tmp_path,
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunelab: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_a_preset_that_exists_composes(tmp_path):
    proc = run_cli("experiment=cpu-budget", "--cfg", "job", cache_dir=tmp_path / "cache", data_root=tmp_path,
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "experiment: cpu-budget" in proc.stdout


def test_hydra_full_error_keeps_hydras_own_report(tmp_path):
    proc = run_cli("method=foo", cache_dir=tmp_path / "cache", data_root=tmp_path, cwd=tmp_path, timeout=120,
                   HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
