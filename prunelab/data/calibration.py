"""Calibration windows, sampled as in SparseGPT / Wanda, cached by everything that determines them.

``random.seed(seed)``; for each of ``nsamples`` windows pick random documents until one is longer
than ``seqlen`` tokens, then a random ``seqlen`` window of it. A single-stream source (WikiText-2
train) is treated as one long document.

The windows are cached in ``<cache_dir>/calib/<key>.pt`` together with their key and fingerprint;
a cached file is used only when it loads with ``weights_only=True`` and its key, shape
``(nsamples, seqlen)``, dtype int64 and fingerprint all check out. Any other file is named in a
warning and rebuilt (sampled again and atomically replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from prunelab.config.schema import CalibConfig
from prunelab.config.typed import typed

from prunelab.data.sources import C4_VALIDATION, TextSource, calibration_source
from prunelab.data.tokens import ids_fingerprint, tokenizer_fingerprint
from prunelab.io.staging import remove_stale_staging, staging_path

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the file holds {key, fingerprint, windows}, not a bare tensor
MAX_ADDED_TOKENS = 8  # special tokens one tokenizer call may add (BOS, EOS, a SentencePiece prefix)
BYTES_PER_TOKEN_CEILING = 16  # no causal LM's tokenizer averages more UTF-8 bytes per token on text


class CalibrationError(ValueError):
    """The calibration set cannot be built with these settings."""


def size_verdict(size: int, calls: int, count: int) -> bool | None:
    """Whether text of ``size`` UTF-8 bytes, tokenized in ``calls`` calls, holds at least ``count`` tokens, where
    its size alone tells: False when even a token per byte (plus ``MAX_ADDED_TOKENS`` per call) falls short,
    True when falling short would take over ``BYTES_PER_TOKEN_CEILING`` bytes per token; None otherwise
    (only tokenizing tells). A token covers at least one byte in byte-level BPE, SentencePiece (byte
    fallback) and WordPiece alike."""
    if size + calls * MAX_ADDED_TOKENS < count:
        return False
    if size >= BYTES_PER_TOKEN_CEILING * count:
        return True
    return None


def text_holds_tokens(texts: Sequence[str], count: int, tokenizer: Callable[[], Any], per_text: int = 0) -> bool:
    """Whether ``texts``, each tokenized on its own plus ``per_text`` tokens (an EOS), hold ``count`` tokens in all.

    Decided by size where it can (:func:`size_verdict`); otherwise ``tokenizer()`` (None: cannot tell, so
    True) tokenizes the texts until the count is reached.
    """
    verdict = size_verdict(sum(len(t.encode()) + per_text for t in texts), len(texts), count)
    if verdict is not None:
        return verdict
    tok = tokenizer()
    if tok is None:
        return True
    total = 0
    for text in texts:
        total += len(tok(text).input_ids) + per_text
        if total >= count:
            return True
    return False


def _documents(source: TextSource) -> list[str]:
    """What windows are drawn from: the documents, or a single-stream source (WikiText-2) as one document."""
    return ["\n\n".join(source.documents)] if source.name.startswith("wikitext2") else source.documents


def _no_window(source: TextSource, seqlen: int) -> CalibrationError:
    return CalibrationError(f"no document of {source.description} is longer than calib.seqlen={seqlen} tokens; "
                            f"lower calib.seqlen")


def local_calibration_source(name: str, data_root: str | os.PathLike | None) -> TextSource | None:
    """The calibration source when it is read from the local data root (C4 documents 1100+), else None
    (the hub's sources are not downloaded just to be checked)."""
    if name == "c4" and data_root and (Path(data_root).expanduser() / C4_VALIDATION).is_file():
        return calibration_source(name, data_root)
    return None


def check_window_fits(source: TextSource, tokenizer: Callable[[], Any], seqlen: int) -> None:
    """Refuse ``calib.seqlen`` when no document is longer than it, before the model loads.

    Documents are tried longest first and only those whose size leaves it open are tokenized
    (``tokenizer()``; None: cannot tell). Raises the :class:`CalibrationError` sampling would raise.
    """
    sized = sorted(((len(d.encode()), d) for d in _documents(source)), key=lambda pair: pair[0], reverse=True)
    for size, document in sized:
        verdict = size_verdict(size, 1, seqlen + 1)
        if verdict is False:  # this document and every shorter one hold too few tokens
            break
        if verdict or text_holds_tokens([document], seqlen + 1, tokenizer):
            return
    raise _no_window(source, seqlen)


def sample_windows(source: TextSource, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Return ``LongTensor[nsamples, seqlen]`` of calibration windows (SparseGPT protocol)."""
    documents = _documents(source)
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}
    too_short: set[int] = set()
    windows = []
    for _ in range(nsamples):
        while True:
            if len(too_short) == len(documents):
                raise _no_window(source, seqlen)
            index = rng.randint(0, len(documents) - 1)
            if index not in encoded:
                encoded[index] = tokenizer(documents[index]).input_ids
            if len(encoded[index]) > seqlen:
                break
            too_short.add(index)
        ids = encoded[index]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def cache_key(source: TextSource, tokenizer, nsamples: int, seqlen: int, seed: int) -> str:
    """A hash of everything that determines the windows: data, tokenizer, sampling settings."""
    data_hash = hashlib.sha256()
    for document in source.documents:
        data_hash.update(hashlib.sha256(document.encode()).digest())
    spec = {
        "version": CACHE_VERSION,
        "source": source.name,
        "data": data_hash.hexdigest(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def load_cached_windows(path: Path, key: str, nsamples: int, seqlen: int) -> torch.Tensor | None:
    """The windows cached in ``path`` when every check passes, else None (with a warning naming the file)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
    except Exception as err:  # torch.load raises many types on a damaged or foreign file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log.warning("calibration cache %s is unreadable (%s); sampling the windows again", path, reason)
        return None
    problem = _cache_problem(stored, key, nsamples, seqlen)
    if problem:
        log.warning("calibration cache %s %s; sampling the windows again", path, problem)
        return None
    return stored["windows"]


def _cache_problem(stored: Any, key: str, nsamples: int, seqlen: int) -> str | None:
    if not isinstance(stored, dict) or not isinstance(stored.get("windows"), torch.Tensor):
        return "does not hold {key, fingerprint, windows}"
    windows = stored["windows"]
    if stored.get("key") != key:
        return f"belongs to key {stored.get('key')!r}, not {key!r}"
    if tuple(windows.shape) != (nsamples, seqlen) or windows.dtype != torch.int64:
        return f"holds {windows.dtype} {tuple(windows.shape)}, expected torch.int64 {(nsamples, seqlen)}"
    if stored.get("fingerprint") != ids_fingerprint(windows):
        return "holds windows that do not match their recorded fingerprint"
    return None


def save_cached_windows(path: Path, key: str, windows: torch.Tensor) -> None:
    """Write the windows with their key and fingerprint, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent)
    tmp = staging_path(path)
    try:
        torch.save({"key": key, "fingerprint": ids_fingerprint(windows), "windows": windows}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def get_calibration(
    tokenizer, calib_cfg: CalibConfig | Mapping[str, Any], data_root: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Build (or load from a checked cache) the calibration windows and a record of how they were made.

    ``calib_cfg``: the ``calib`` block (``CalibConfig`` or a mapping of its fields).
    """
    calib_cfg = typed(CalibConfig, calib_cfg, "calib")
    source = calibration_source(calib_cfg.source, data_root)
    nsamples, seqlen, seed = calib_cfg.nsamples, calib_cfg.seqlen, calib_cfg.seed
    key = cache_key(source, tokenizer, nsamples, seqlen, seed)
    path = Path(cache_dir).expanduser() / "calib" / f"{key}.pt" if cache_dir else None
    windows = load_cached_windows(path, key, nsamples, seqlen) if path is not None else None
    if windows is not None:
        log.info("calibration: %d x %d tokens from cache %s", nsamples, seqlen, path)
    else:
        windows = sample_windows(source, tokenizer, nsamples, seqlen, seed)
        if path is not None:
            save_cached_windows(path, key, windows)
        log.info("calibration: sampled %d x %d tokens from %s", nsamples, seqlen, source.description)
    record = {
        "source": source.name,
        "description": source.description,
        "origin": source.origin,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "cache_key": key,
        "fingerprint": ids_fingerprint(windows),
    }
    return windows, record
