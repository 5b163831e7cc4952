"""Text sources for evaluation and calibration, from a local data root or the Hugging Face hub.

A local data root is laid out like ``shared/data``::

    wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet   # WikiText-2 raw test, one row per line
    c4/c4-validation-2k.parquet                              # 2,000 C4 en validation documents

C4 documents 0-1099 are for evaluation and 1100+ for calibration, so the two never overlap.
A local file must be a readable parquet file with a string ``text`` column; :func:`check_available` reads its
footer (schema) before any model loads, so a truncated or wrong file stops a run in seconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

WIKITEXT2_TEST = Path("wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet")
C4_VALIDATION = Path("c4/c4-validation-2k.parquet")
C4_EVAL_DOCS = 1100  # the papers' protocol: first 1,100 validation documents
C4_HUB_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_HUB_TRAIN = "en/c4-train.00000-of-01024.json.gz"


class DataUnavailableError(RuntimeError):
    """Neither a local data root nor the hub can provide a text source."""


@dataclass(frozen=True)
class TextSource:
    """Documents plus where they came from (recorded with every number)."""

    name: str
    documents: list[str]
    origin: str  # local file path or hub dataset id
    description: str


def _local(data_root: str | os.PathLike | None, relative: Path) -> Path | None:
    if not data_root:
        return None
    path = Path(data_root).expanduser() / relative
    return path if path.is_file() else None


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded and made absolute, for messages a person acts on."""
    return Path(path).expanduser().resolve()


def _unavailable(what: str, relative: Path, data_root: str | os.PathLike | None, err: Exception | None) -> DataUnavailableError:
    where = f"{_absolute(data_root) / relative} does not exist" if data_root else "no data root is set"
    reason = f"; the hub failed too: {type(err).__name__}: {err}" if err else ""
    return DataUnavailableError(
        f"{what} is not available: {where}{reason}. Set PRUNELAB_DATA (or data_root=...) to a folder laid out "
        f"like shared/data (it must hold {relative}), or go online so the hub can serve it."
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so a missing data root fails in seconds, not retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


_FIX_HINT = "replace it with a good copy or point PRUNELAB_DATA (or data_root=...) at a folder laid out like shared/data"


def _bad_file(path: Path, problem: str) -> DataUnavailableError:
    return DataUnavailableError(f"{_absolute(path)} {problem}; {_FIX_HINT}")


def _is_text_type(dtype: "pa.DataType") -> bool:
    """Arrow string types (plain, large, view, or dictionary-encoded strings)."""
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or str(dtype) == "string_view"


def check_parquet(path: Path, column: str = "text") -> None:
    """Read only the footer of ``path`` and check it holds a string ``column``.

    Raises:
        DataUnavailableError: naming the absolute path and what is wrong.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise _bad_file(path, f"is not a readable parquet file ({type(err).__name__}: {err})") from err
    if column not in schema.names:
        raise _bad_file(path, f"has no {column!r} column (its columns: {', '.join(schema.names) or 'none'})")
    dtype = schema.field(column).type
    if not _is_text_type(dtype):
        raise _bad_file(path, f"has a {column!r} column of type {dtype}, not a string type")


def _read_parquet_column(path: Path, column: str = "text") -> list[str]:
    """All values of ``column``; a bad file raises DataUnavailableError naming it, not a pyarrow error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_parquet(path, column)
    try:
        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise _bad_file(path, f"could not be read ({type(err).__name__}: {err})") from err


def _hub(what: str, relative: Path, data_root: str | os.PathLike | None, *args, **kwargs) -> list[str]:
    """The ``text`` column of a hub dataset, or DataUnavailableError saying what to set."""
    if hub_offline():
        raise _unavailable(what, relative, data_root, None)
    import datasets

    try:
        return list(datasets.load_dataset(*args, **kwargs)["text"])
    except Exception as err:  # network, auth, missing dataset: all mean "not available"
        raise _unavailable(what, relative, data_root, err) from err


def check_available(name: str, data_root: str | os.PathLike | None, purpose: str = "eval") -> None:
    """Fail fast (before a model loads) when a source has no local file and the hub is off, or its local file is
    not a parquet file with a string ``text`` column (only the footer is read)."""
    if purpose == "calib" and name == "wikitext2":
        if hub_offline() or not hub_reachable():
            raise DataUnavailableError(
                "calib=wikitext2 needs the WikiText-2 train split from the hub, and the hub is offline or unreachable; "
                "use calib=c4 (local C4 documents 1100+) or go online"
            )
        return
    relative = WIKITEXT2_TEST if name == "wikitext2" else C4_VALIDATION
    path = _local(data_root, relative)
    if path is not None:
        check_parquet(path)
    elif hub_offline() or not hub_reachable():
        raise _unavailable(name, relative, data_root, None)


def wikitext2_test(data_root: str | os.PathLike | None) -> TextSource:
    """WikiText-2 raw v1 test split, one entry per line of the original file."""
    path = _local(data_root, WIKITEXT2_TEST)
    if path is not None:
        return TextSource("wikitext2", _read_parquet_column(path), str(path), "WikiText-2 raw v1, test split")
    docs = _hub("WikiText-2", WIKITEXT2_TEST, data_root, "wikitext", "wikitext-2-raw-v1", split="test")
    return TextSource("wikitext2", docs, "hub:wikitext/wikitext-2-raw-v1", "WikiText-2 raw v1, test split")


def wikitext2_train() -> TextSource:
    """WikiText-2 raw v1 train split (hub only), for calibration."""
    if hub_offline():
        raise DataUnavailableError("WikiText-2 train is hub-only and HF_HUB_OFFLINE is set; use calib=c4")
    import datasets

    try:
        docs = list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])
    except Exception as err:
        raise DataUnavailableError(f"WikiText-2 train could not be fetched from the hub: {err}; use calib=c4") from err
    return TextSource("wikitext2-train", docs, "hub:wikitext/wikitext-2-raw-v1:train", "WikiText-2 raw v1, train split")


def c4_eval(data_root: str | os.PathLike | None) -> TextSource:
    """The first 1,100 C4 validation documents (evaluation side)."""
    path = _local(data_root, C4_VALIDATION)
    if path is not None:
        docs = _read_parquet_column(path)[:C4_EVAL_DOCS]
        return TextSource("c4", docs, str(path), "C4 en validation, 2k-document subset, documents 0-1099")
    docs = _hub("C4", C4_VALIDATION, data_root, "allenai/c4", data_files={"validation": C4_HUB_VALIDATION}, split="validation")
    docs = docs[:C4_EVAL_DOCS]
    return TextSource("c4", docs, f"hub:allenai/c4:{C4_HUB_VALIDATION}", "C4 en validation shard 0, documents 0-1099")


def c4_calibration(data_root: str | os.PathLike | None) -> TextSource:
    """C4 documents never used for evaluation: local subset 1100+, or the hub's train shard."""
    path = _local(data_root, C4_VALIDATION)
    if path is not None:
        docs = _read_parquet_column(path)[C4_EVAL_DOCS:]
        return TextSource("c4-calib", docs, str(path), "C4 en validation, 2k-document subset, documents 1100+")
    docs = _hub("C4", C4_VALIDATION, data_root, "allenai/c4", data_files={"train": C4_HUB_TRAIN}, split="train")
    return TextSource("c4-calib", docs, f"hub:allenai/c4:{C4_HUB_TRAIN}", "C4 en train shard 0")


def eval_source(name: str, data_root: str | os.PathLike | None) -> TextSource:
    if name == "wikitext2":
        return wikitext2_test(data_root)
    if name == "c4":
        return c4_eval(data_root)
    raise ValueError(f"unknown text source {name!r}; allowed values: wikitext2, c4")


def calibration_source(name: str, data_root: str | os.PathLike | None) -> TextSource:
    if name == "c4":
        return c4_calibration(data_root)
    if name == "wikitext2":
        return wikitext2_train()
    raise ValueError(f"unknown calibration source {name!r}; allowed values: c4, wikitext2")
