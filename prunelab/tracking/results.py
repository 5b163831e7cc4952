"""``results.json``: what a run did and measured, written atomically and only when complete.

A failed or interrupted run writes ``failed.json`` instead (with the error), so a folder that
holds ``results.json`` always holds a complete result.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from prunelab.io.checksums import CHECKSUMS, seal, seal_problem
from prunelab.io.staging import new_file_mode
from prunelab.tracking.files import COMPLETE, FAILED_FILE, RESULTS_FILE, SKIPPED_FILE

log = logging.getLogger(__name__)

_PACKAGES = ("prunelab", "torch", "transformers", "hydra-core", "omegaconf", "lm_eval", "datasets", "safetensors", "wandb", "gguf")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place.

    The file gets the permissions any new file gets (0666 less the umask), not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(folder: Path | None = None) -> dict[str, Any]:
    """The commit and dirtiness of the prunelab checkout (None outside a git checkout)."""
    folder = folder or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def write_results(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write the complete ``results.json`` (status "complete") and remove a stale failed.json / skipped.json."""
    path = Path(run_dir) / RESULTS_FILE
    # sealed: a re-run trusts it only while every entry still has the sha256 it was written with
    write_json_atomic(path, seal({"status": COMPLETE, **payload}))
    for name in (FAILED_FILE, SKIPPED_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)
    log.info("wrote %s", path)
    return path


def write_failure(run_dir: Path, payload: dict[str, Any], error: BaseException, phase: str | None = None) -> Path:
    """Record a failed or interrupted run in ``failed.json``; never touches results.json.

    ``phase`` names the step that was running (preflight, load, calibration_data, prune, perplexity, ...);
    an interruption by a signal also records the signal's name.
    """
    path = Path(run_dir) / FAILED_FILE
    record: dict[str, Any] = {
        "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
        "phase": phase,
        "error": f"{type(error).__name__}: {error}",
    }
    signal_name = getattr(error, "signal_name", None)
    if signal_name:
        record["signal"] = signal_name
    record["traceback"] = traceback.format_exception(error)
    write_json_atomic(path, {**record, **payload})
    log.info("wrote %s (%s during %s)", path, record["status"], phase)
    return path


# keys of the resolved config that do not change a run's numbers
FINGERPRINT_IGNORES = ("checkpoint", "logger", "tags", "redo", "optimized_metric")


def config_fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = FINGERPRINT_IGNORES) -> str:
    """sha256 of the resolved configuration without the keys that do not change the numbers.

    It keys a run's checkpoint (a resume continues only the same config) and decides whether a
    complete results.json in the run folder already answers a re-run (``redo=false``).
    """
    import hashlib

    kept = {key: value for key, value in config.items() if key not in ignore}
    # as results.json stores it: mapping keys become strings (allocation.layers={0-5: 0.3, 7: 0.5} mixes
    # them, which json cannot sort), then sorted, so the live config and a re-read one hash alike
    stored = json.loads(json.dumps(kept, default=str))
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


class ForeignResults(ValueError):
    """The run folder holds the complete results of another config; nothing was run or written."""


def completed_before(run_dir: Path, fingerprint: str, replace: bool = False) -> dict[str, Any] | None:
    """The folder's complete ``results.json`` when its config has ``fingerprint`` (else None).

    The fingerprint of the earlier run is recomputed from the ``config`` its results.json records, so
    results written before fingerprints existed are recognised too. An unreadable or incomplete file is
    never trusted, nor one whose entries no longer match the checksums written with them (an edited
    metric is not served to a sweep run again). With ``replace`` (``redo=true``) any earlier results are left to be replaced.

    Raises:
        ForeignResults: the folder holds complete results of another config (and not ``replace``): a run
            never overwrites finished results it did not produce.
    """
    if replace:
        return None
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): the run goes ahead and replaces it", path, err)
        return None
    if not isinstance(previous, dict) or previous.get("status") != COMPLETE or not isinstance(previous.get("config"), dict):
        return None
    problem = seal_problem(previous) if CHECKSUMS in previous else None  # results of before the seal: fingerprint only
    if problem:
        log.warning("%s %s: not trusted; the run goes ahead and replaces it", path, problem)
        return None
    if config_fingerprint(previous["config"]) != fingerprint:
        raise ForeignResults(f"{run_dir} holds the complete results of another configuration; run into another folder "
                             f"(hydra.run.dir= / hydra.sweep.dir=) or set redo=true to replace them")
    return previous


def write_skipped(run_dir: Path, fingerprint: str) -> Path:
    """Record that this invocation ran nothing because the folder's results.json is this config's."""
    import datetime

    path = Path(run_dir) / SKIPPED_FILE
    write_json_atomic(path, {"status": "skipped", "config_fingerprint": fingerprint,
                             "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "reason": f"{RESULTS_FILE} is complete for the same resolved config; redo=true runs it again"})
    return path
