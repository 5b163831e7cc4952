"""Tests reuse the user's converted default model instead of converting it again (a minute of CPU).

Only a conversion whose manifest verifies is reused, and only through a symlink from the test cache:
nothing is ever written into the user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from prunelab.models.loading import ModelLoadError, cache_folder, verify_manifest

USER_CACHE = Path(os.environ.get("HOME", "~")).expanduser() / ".cache" / "prunelab"  # prunelab/conf/config.yaml's default


def link_user_model_cache(test_cache: Path, user_cache: Path, model_cfg: dict) -> Path | None:
    """Link ``user_cache``'s verified conversion of ``model_cfg`` into ``test_cache``; None when there is none."""
    sha = model_cfg.get("sha256")
    if not sha:
        return None
    source = cache_folder(str(model_cfg["name"]), sha, user_cache)
    if not source.is_dir():
        return None
    try:
        verify_manifest(source, sha)
    except ModelLoadError:
        return None
    link = cache_folder(str(model_cfg["name"]), sha, test_cache)
    if link.exists() or link.is_symlink():
        return None
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source, target_is_directory=True)
    return link
