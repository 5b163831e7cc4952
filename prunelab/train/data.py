"""Token windows to train on: text that is never evaluation text.

``corpus=c4`` reads the calibration side of C4 (local documents 1100+, or the hub's train shard),
``corpus=files`` local ``.txt`` files or parquet files with a ``text`` column, ``corpus=hub`` any hub
dataset with a ``text`` column. Documents are shuffled with the fine-tuning seed, tokenized, joined
with the EOS token and cut into windows of ``seqlen`` tokens until the budget is met.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from prunelab.config.schema import FinetuneConfig
from prunelab.config.typed import typed

log = logging.getLogger(__name__)

KNOWN_CORPORA = ("c4", "files", "hub")


TEXT_CHECK_BYTES = 1 << 20  # how much of a text file is checked to be UTF-8 before the model loads


class TrainDataError(ValueError):
    """The fine-tuning corpus cannot provide what the settings ask for."""


def check_corpus_file(name: str) -> None:
    """A ``finetune.files`` entry must be a parquet file with a string ``text`` column (its footer is read) or
    UTF-8 text (its first MiB is read), the two kinds ``corpus_documents`` reads.

    Raises:
        TrainDataError: naming the file and what is wrong.
    """
    path = Path(name).expanduser()
    if not path.is_file():
        raise TrainDataError(f"finetune.files: {name!r} is not a file")
    if path.suffix == ".parquet":
        from prunelab.data.sources import DataUnavailableError, check_parquet

        try:
            check_parquet(path)
        except DataUnavailableError as err:
            raise TrainDataError(f"finetune.files: {err}") from None
        return
    with open(path, "rb") as file:
        head = file.read(TEXT_CHECK_BYTES)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as err:
        raise TrainDataError(f"finetune.files: {name!r} is neither a .parquet file nor UTF-8 text (byte {err.start} "
                             f"does not decode); give .txt files or parquet files with a text column") from None
    if b"\0" in head:
        raise TrainDataError(f"finetune.files: {name!r} holds NUL bytes, so it is not a text file; give .txt files or "
                             f"parquet files with a text column")


def _too_short(seqlen: int) -> TrainDataError:
    return TrainDataError(f"the fine-tuning corpus holds fewer than finetune.seqlen={seqlen} tokens; lower "
                          f"finetune.seqlen or add text")


def check_corpus_holds_window(documents: list[str], seqlen: int, tokenizer: Callable[[], Any]) -> None:
    """Refuse, before the model loads, a corpus that cannot fill one window of ``seqlen`` tokens (documents
    joined with EOS, as :func:`pack_windows` does); tokenizes only where the text's size leaves it open."""
    from prunelab.data.calibration import text_holds_tokens

    texts = [d for d in documents if d and d.strip()]
    if not texts:
        raise TrainDataError("the fine-tuning corpus holds no text")
    if not text_holds_tokens(texts, seqlen, tokenizer, per_text=1):
        raise _too_short(seqlen)


def corpus_documents(cfg: FinetuneConfig | Mapping[str, Any], data_root: str | os.PathLike | None) -> tuple[list[str], str]:
    """``(documents, description)`` of the configured corpus (the ``finetune`` block's corpus fields)."""
    cfg = typed(FinetuneConfig, cfg, "finetune")
    corpus = cfg.corpus
    if corpus == "c4":
        from prunelab.data.sources import c4_calibration

        source = c4_calibration(data_root)
        return source.documents, f"{source.description} ({source.origin})"
    if corpus == "files":
        documents: list[str] = []
        for name in cfg.files:
            path = Path(name).expanduser()
            if path.suffix == ".parquet":
                from prunelab.data.sources import _read_parquet_column

                documents.extend(_read_parquet_column(path))
            else:
                documents.append(path.read_text())
        return documents, f"{len(cfg.files)} local file(s)"
    if corpus == "hub":
        import datasets

        data = datasets.load_dataset(cfg.hub_dataset, cfg.hub_config, split=cfg.hub_split)
        return list(data["text"]), f"hub:{cfg.hub_dataset}"
    raise TrainDataError(f"finetune.corpus={corpus!r} is not valid; allowed values: {', '.join(KNOWN_CORPORA)}")


def pack_windows(documents: Iterable[str], tokenizer: Any, seqlen: int, count: int, seed: int) -> torch.Tensor:
    """``LongTensor[count, seqlen]``: shuffled documents joined with EOS, cut into windows.

    Stops tokenizing once ``count`` windows are full; when the corpus holds fewer, the windows are
    repeated (epochs) and a warning says so.
    """
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise TrainDataError("the fine-tuning corpus holds no text")
    random.Random(seed).shuffle(documents)
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    windows: list[list[int]] = []
    for text in documents:
        buffer.extend(tokenizer(text).input_ids)
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seqlen and len(windows) < count:
            windows.append(buffer[:seqlen])
            buffer = buffer[seqlen:]
        if len(windows) == count:
            break
    if not windows:
        raise _too_short(seqlen)
    if len(windows) < count:
        log.warning("fine-tuning corpus gives %d windows of %d tokens; the budget needs %d: repeating them",
                    len(windows), seqlen, count)
        windows = [windows[i % len(windows)] for i in range(count)]
    return torch.tensor(windows, dtype=torch.long)
