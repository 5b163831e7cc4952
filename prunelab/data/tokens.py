"""Token streams for perplexity, built with the papers' joining rules, with a fingerprint."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from prunelab.data.sources import TextSource

log = logging.getLogger(__name__)

C4_EVAL_WINDOWS = 256  # SparseGPT: C4 evaluation is truncated to 256 x seqlen tokens


@dataclass(frozen=True)
class TokenStream:
    """One long row of token ids and how it was made."""

    name: str
    ids: torch.Tensor  # [1, numel], int64
    protocol: str
    origin: str

    @property
    def numel(self) -> int:
        return int(self.ids.numel())

    @property
    def fingerprint(self) -> str:
        return ids_fingerprint(self.ids)


def ids_fingerprint(ids: torch.Tensor) -> str:
    """sha256 of token ids as little-endian int32: equal ids, equal fingerprints."""
    return hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what determines the tokenizer's output (its serialized definition)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'add_bos_token', None)}|{getattr(tokenizer, 'add_eos_token', None)}"
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids], dtype=torch.long)


def eval_stream(source: TextSource, tokenizer, seqlen: int) -> TokenStream:
    """Tokenize an evaluation source once, as the SparseGPT / Wanda evaluation code does.

    WikiText-2: ``"\\n\\n".join(rows)``. C4: the 1,100 evaluation documents joined with a space,
    truncated to ``256 * seqlen`` tokens.
    """
    if source.name == "wikitext2":
        ids = _encode(tokenizer, "\n\n".join(source.documents))
        protocol = 'wikitext2: "\\n\\n".join(test rows), one tokenizer call'
    elif source.name == "c4":
        ids = _encode(tokenizer, " ".join(source.documents))[:, : C4_EVAL_WINDOWS * seqlen]
        protocol = f'c4: " ".join({len(source.documents)} validation docs), first {C4_EVAL_WINDOWS}*seqlen tokens'
    else:
        raise ValueError(f"no evaluation protocol for source {source.name!r}")
    log.info("%s: %d tokens", source.name, ids.numel())
    return TokenStream(source.name, ids, protocol, source.origin)
