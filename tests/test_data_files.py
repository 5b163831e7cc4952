"""Bad local data files (truncated, garbage, no ``text`` column) are named before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prunelab.data import sources
from prunelab.data.sources import C4_VALIDATION, WIKITEXT2_TEST, DataUnavailableError

REPO = Path(__file__).resolve().parents[1]


def _place(root: Path, relative: Path) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _truncated_copy(source: Path, root: Path, relative: Path) -> Path:
    """The first half of a good parquet file: its footer (schema, row groups) is gone."""
    path = _place(root, relative)
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _table_file(root: Path, relative: Path, table: pa.Table, **kwargs) -> Path:
    path = _place(root, relative)
    pq.write_table(table, path, **kwargs)
    return path


@pytest.fixture
def bad_root(tmp_path: Path, data_root: Path) -> Path:
    """A data root whose WikiText-2 file is truncated and whose C4 file has no ``text`` column."""
    root = tmp_path / "bad-data"
    _truncated_copy(data_root / WIKITEXT2_TEST, root, WIKITEXT2_TEST)
    _table_file(root, C4_VALIDATION, pa.table({"content": ["a document", "another one"]}))
    return root


def test_truncated_parquet_is_named_with_its_absolute_path(bad_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative data root must still give an absolute path in the message
    with pytest.raises(DataUnavailableError) as info:
        sources.check_available("wikitext2", "bad-data")
    message = str(info.value)
    assert str((bad_root / WIKITEXT2_TEST).resolve()) in message
    assert "not a readable parquet file" in message and "PRUNELAB_DATA" in message
    assert "\n" not in message


def test_garbage_bytes_are_not_a_parquet_file(tmp_path: Path) -> None:
    path = _place(tmp_path, C4_VALIDATION)
    path.write_bytes(b"<html>404 Not Found</html>\n" * 100)
    for purpose in ("eval", "calib"):
        with pytest.raises(DataUnavailableError, match="not a readable parquet file") as info:
            sources.check_available("c4", tmp_path, purpose=purpose)
        assert str(path.resolve()) in str(info.value)


def test_missing_text_column_is_named(bad_root: Path) -> None:
    with pytest.raises(DataUnavailableError, match="has no 'text' column") as info:
        sources.check_available("c4", bad_root, purpose="calib")
    message = str(info.value)
    assert str((bad_root / C4_VALIDATION).resolve()) in message and "content" in message


def test_text_column_of_numbers_is_refused(tmp_path: Path) -> None:
    _table_file(tmp_path, WIKITEXT2_TEST, pa.table({"text": [1, 2, 3]}))
    with pytest.raises(DataUnavailableError, match="not a string type"):
        sources.check_available("wikitext2", tmp_path)


def test_good_files_pass(data_root: Path, tmp_path: Path) -> None:
    sources.check_available("wikitext2", data_root)
    sources.check_available("c4", data_root)
    sources.check_available("c4", data_root, purpose="calib")
    # large strings and dictionary-encoded strings are text as well
    _table_file(tmp_path, WIKITEXT2_TEST, pa.table({"text": pa.array(["a", "b"], pa.large_string())}))
    _table_file(tmp_path, C4_VALIDATION, pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}))
    sources.check_available("wikitext2", tmp_path)
    sources.check_available("c4", tmp_path)
    assert sources.c4_eval(tmp_path).documents == ["a", "b", "a"]


def test_corrupt_rows_behind_a_good_footer_raise_data_unavailable(tmp_path: Path) -> None:
    """The footer check passes; reading the rows later still names the file instead of a pyarrow traceback."""
    docs = [f"document {i} " + "word " * 200 for i in range(200)]
    path = _table_file(tmp_path, WIKITEXT2_TEST, pa.table({"text": docs}), compression="snappy")
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle: middle + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    sources.check_available("wikitext2", tmp_path)  # only the footer is read here
    with pytest.raises(DataUnavailableError, match="could not be read") as info:
        sources.wikitext2_test(tmp_path)
    assert str(path.resolve()) in str(info.value)


def test_cli_stops_before_the_model_loads_on_a_bad_file(bad_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, PRUNELAB_DATA=str(bad_root), PRUNELAB_CACHE=str(tmp_path / "cache"), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "prunelab", "method=dense", "logger=none", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in proc.stderr
    assert str((bad_root / WIKITEXT2_TEST).resolve()) in output
    assert not (run_dir / "results.json").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors")), \
        "the model was converted/loaded before the data check"
