"""Checksums over the JSON that caches and checkpoints read back, so damage is caught, not trusted.

A cache entry or a checkpoint keeps values that no key and no tensor hash covers: an OWL pre-pass's
per-layer ratios, a checkpoint's step counter, a statistics entry's token counts, a stream's
per-layer tallies. :func:`seal` stores, beside them, the sha256 of each top-level entry's canonical
JSON (sorted keys, no spaces); :func:`seal_problem` recomputes them on read and names the entries
that changed.

These checksums catch damage (a flipped byte, an edit by hand, a half-copied file), not deliberate
forgery: whoever edits a value and recomputes its checksum (a re-signed manifest) passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

CHECKSUMS = "checksums"  # the key under which a sealed object keeps the sha256 of each of its other entries


def content_sha256(value: Any) -> str:
    """sha256 of ``value``'s canonical JSON (sorted keys, compact): the same for equal JSON values."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(payload: Mapping[str, Any], default: Callable[[Any], Any] | None = str) -> dict[str, Any]:
    """``payload`` as JSON reads it back, with ``CHECKSUMS``: the sha256 of each entry.

    ``default`` converts what JSON cannot store (as ``json.dumps``'s ``default``); the checksums
    cover the converted values, so they hold for what a reader gets back.
    """
    if CHECKSUMS in payload:
        raise ValueError(f"a sealed object keeps its checksums under {CHECKSUMS!r}; the payload cannot use that key")
    plain = json.loads(json.dumps(dict(payload), default=default))
    plain[CHECKSUMS] = {key: content_sha256(value) for key, value in plain.items()}
    return plain


def seal_problem(stored: Any) -> str | None:
    """What is wrong with a sealed object read back (one phrase), or None when every checksum matches."""
    if not isinstance(stored, dict):
        return f"holds a JSON {type(stored).__name__}, not an object"
    recorded = stored.get(CHECKSUMS)
    if not isinstance(recorded, dict):
        return f"has no {CHECKSUMS!r} (written by an older prunelab, or edited)"
    content = {key: value for key, value in stored.items() if key != CHECKSUMS}
    changed = sorted(key for key in content.keys() & recorded.keys() if content_sha256(content[key]) != recorded[key])
    missing, added = sorted(recorded.keys() - content.keys()), sorted(content.keys() - recorded.keys())
    parts = ([f"{', '.join(map(repr, changed))} changed since it was written (sha256 mismatch)"] if changed else []) + \
            ([f"{', '.join(map(repr, missing))} missing"] if missing else []) + \
            ([f"{', '.join(map(repr, added))} added"] if added else [])
    return "; ".join(parts) or None


def unsealed(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A sealed object without its checksums (what was sealed)."""
    return {key: value for key, value in stored.items() if key != CHECKSUMS}
