"""The job grid a Hydra multirun planned, and the jobs of it that never got a folder.

Hydra's basic sweeper saves the sweep's whole config as ``<sweep>/multirun.yaml`` before it launches a job:
``hydra.overrides.task`` holds the command-line overrides (``method=wanda sparsity=0.5,0.6``) and
``hydra.sweeper.params`` any configured ones. Expanding them with Hydra's own parser and
``BasicSweeper.split_arguments`` (through ``prunelab.sweeper.expand``) gives every job's overrides in launch order (the index is ``hydra.job.num``).
Each launched job writes its overrides to ``.hydra/overrides.yaml`` in its folder; a planned job whose
overrides match no such file below the sweep folder was never launched (the sweep was killed first).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MULTIRUN_FILE = "multirun.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators; ``.`` for ``root`` itself."""
    rel = os.path.relpath(path, root)
    return "." if rel == "." else rel.replace(os.sep, "/")


def read_overrides(job_dir: Path) -> list[str]:
    """The job's ``.hydra/overrides.yaml`` as a list of ``key=value`` strings; empty when missing or unreadable."""
    path = job_dir / OVERRIDES_FILE
    if not path.is_file():
        return []
    try:
        from omegaconf import OmegaConf

        return [str(x) for x in OmegaConf.to_container(OmegaConf.load(path)) or []]
    except Exception:  # a report must not die on one bad file
        log.warning("%s is unreadable; its job is reported without overrides", path)
        return []


@dataclass(frozen=True)
class PlannedJob:
    """One job of a sweep grid that has no job folder."""

    sweep: str  # sweep folder relative to the report's folder
    num: int  # hydra.job.num: the job's place in the grid
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        """``job #3``, prefixed by the sweep folder when the report covers several."""
        return f"job #{self.num}" if self.sweep == "." else f"{self.sweep} job #{self.num}"

    def describe(self) -> str:
        return f"{self.label}: never launched [{' '.join(self.overrides)}]"


@dataclass
class GridCheck:
    """What the ``multirun.yaml`` files below a folder planned, against the job folders that exist."""

    checked: list[str] = field(default_factory=list)  # sweep folders whose grid was expanded
    unchecked: dict[str, str] = field(default_factory=dict)  # sweep folder -> why its grid is unknown
    never_launched: list[PlannedJob] = field(default_factory=list)


def planned_jobs(multirun_yaml: Path) -> list[list[str]]:
    """The grid of the sweep whose ``multirun.yaml`` this is.

    Raises:
        ValueError: when the file is unreadable, the sweeper is neither Hydra's basic sweeper nor prunelab's
            grids sweeper (its jobs are not a fixed grid), or an override cannot be expanded without the app's config (``glob(...)``).
    """
    from omegaconf import OmegaConf

    from prunelab.sweeper import PLANNED_FILE

    try:
        config = OmegaConf.to_container(OmegaConf.load(multirun_yaml), resolve=False)
    except Exception as err:
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from err
    planned = multirun_yaml.parent / PLANNED_FILE  # the grids sweeper's own list (same-config duplicates dropped)
    return grid_of((config or {}).get("hydra") or {}, planned if planned.is_file() else None)


def grid_of(hydra: Mapping[str, Any], planned_file: Path | None = None) -> list[list[str]]:
    """Every job's overrides that a sweep with this ``hydra`` config node plans, in launch order.

    With the grids sweeper, ``planned_file`` (its ``planned_jobs.yaml``) is the exact list; without it the
    expansion may hold jobs the sweeper dropped as duplicates of the same config.

    Raises:
        ValueError: as :func:`planned_jobs`.
    """
    from omegaconf import OmegaConf

    from prunelab.sweeper import TARGET as GRIDS_SWEEPER
    from prunelab.sweeper import expand

    sweeper = hydra.get("sweeper") or {}
    if sweeper.get("_target_") not in (BASIC_SWEEPER, GRIDS_SWEEPER):
        raise ValueError(f"sweeper {sweeper.get('_target_')!r} does not plan a fixed grid")
    task = [str(o) for o in (hydra.get("overrides") or {}).get("task") or []]
    if sweeper.get("_target_") == GRIDS_SWEEPER and planned_file is not None:
        try:
            return [[str(o) for o in job] for job in OmegaConf.to_container(OmegaConf.load(planned_file))]
        except Exception as err:
            raise ValueError(f"{planned_file} unreadable ({type(err).__name__}: {err})") from err
    try:
        return expand(task, sweeper.get("params"), sweeper.get("grids"))  # the basic sweeper has no grids
    except Exception as err:  # Hydra's parser raises several types; any of them means "unknown grid"
        raise ValueError(f"overrides {task} could not be expanded ({type(err).__name__}: {err})") from err


def _launched(sweep_dir: Path) -> Counter[tuple[str, ...]]:
    """How many job folders below ``sweep_dir`` ran with each (sorted) override list."""
    found: Counter[tuple[str, ...]] = Counter()
    for path in sweep_dir.rglob(OVERRIDES_FILE.as_posix()):
        found[tuple(sorted(read_overrides(path.parent.parent)))] += 1
    return found


def check_grids(folder: str | os.PathLike) -> GridCheck:
    """Find every ``multirun.yaml`` below ``folder`` and the planned jobs of each that have no job folder."""
    root = Path(folder)
    result = GridCheck()
    for multirun_yaml in sorted(root.rglob(MULTIRUN_FILE)):
        sweep = relative_name(multirun_yaml.parent, root)
        try:
            grid = planned_jobs(multirun_yaml)
        except ValueError as err:
            result.unchecked[sweep] = str(err)
            log.warning("%s: grid not checked for never-launched jobs: %s", multirun_yaml, err)
            continue
        result.checked.append(sweep)
        launched = _launched(multirun_yaml.parent)
        for num, overrides in enumerate(grid):
            key = tuple(sorted(overrides))
            if launched[key] > 0:
                launched[key] -= 1
            else:
                result.never_launched.append(PlannedJob(sweep=sweep, num=num, overrides=tuple(overrides)))
    for job in result.never_launched:
        log.warning("%s", job.describe())
    return result
