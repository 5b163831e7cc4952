"""User errors refused before the model loads (issue #21): each is a one-line ConfigError from ``preflight``,
which reads at most the model's config, its tokenizer and the local data, never the weights."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import GPT2Config, LlamaConfig

from prunelab.cli import CONFIG_DIR
from prunelab.config.schema import ConfigError, register, validate
from prunelab.data.sources import C4_EVAL_DOCS, C4_VALIDATION, WIKITEXT2_TEST
from prunelab.prune import allocation
from prunelab.runner import preflight, run

register()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch, tmp_path):
    """Preflight must never load weights: any attempt fails the test. The cache stays in the test's folder."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("preflight loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("prunelab.models.loading.load_model", refuse)
    if not os.environ.get("PRUNELAB_CACHE"):
        monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))


def _folder(root: Path, config, tokenizer) -> Path:
    """A model folder with config and tokenizer but no weights (preflight reads nothing else)."""
    root.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture
def llama_dir(tmp_path, default_tokenizer) -> Path:
    """2 layers, 4 query heads sharing 2 KV heads (GQA), rotary positions up to 256."""
    config = LlamaConfig(vocab_size=len(default_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return _folder(tmp_path / "llama", config, default_tokenizer)


@pytest.fixture
def mha_dir(tmp_path, default_tokenizer) -> Path:
    """3 layers, 4 heads each with its own KV head."""
    config = LlamaConfig(vocab_size=len(default_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return _folder(tmp_path / "mha", config, default_tokenizer)


@pytest.fixture
def gpt2_dir(tmp_path, default_tokenizer) -> Path:
    """Learned positions: a table of 64."""
    config = GPT2Config(vocab_size=len(default_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _folder(tmp_path / "gpt2", config, default_tokenizer)


def _check(model_dir: Path, data_root: Path, *overrides: str):
    return preflight(_compose("model=hf", f"model.path={model_dir}", f"data_root={data_root}", "logger=none", *overrides))


def _refused(model_dir: Path, data_root: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        _check(model_dir, data_root, *overrides)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


def _write_text_parquet(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), path)


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


# ------------------------------------------------------------------------------- 1: model=hf without a path

def test_model_hf_without_a_path_fails_in_preflight_with_failed_json(tmp_path):
    cfg = _compose("model=hf", "logger=none")
    with pytest.raises(ConfigError, match=r"model=hf needs model.path"):
        run(cfg, tmp_path)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["phase"] == "preflight" and failed["error"].startswith("ConfigError: model=hf needs model.path")
    assert not (tmp_path / "results.json").exists()


def test_the_cli_refuses_model_hf_without_a_path_in_one_line_with_exit_2(tmp_path, data_root):
    from test_run_safety import run_cli

    run_dir = tmp_path / "run"
    proc = run_cli("model=hf", "logger=none", f"hydra.run.dir={run_dir}", cache_dir=tmp_path / "cache",
                   data_root=data_root, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "model=hf needs model.path" in line and "ERROR" in line]
    assert json.loads((run_dir / "failed.json").read_text())["phase"] == "preflight"


# ----------------------------------------------------------------------------------------- 2: finetune.seqlen

def test_finetune_seqlen_past_a_learned_position_table_is_refused(gpt2_dir, data_root):
    ok = ("finetune=masked", "eval.perplexity.seqlen=32")
    _check(gpt2_dir, data_root, *ok, "finetune.seqlen=64")
    message = _refused(gpt2_dir, data_root, *ok, "finetune.seqlen=65")
    assert "finetune.seqlen=65" in message and "max_position_embeddings=64" in message


def test_finetune_seqlen_past_rotary_positions_is_a_recorded_warning(llama_dir, data_root):
    checked = _check(llama_dir, data_root, "finetune=masked", "finetune.seqlen=512", "eval.perplexity.seqlen=64")
    assert any(w.startswith("finetune.seqlen=512 is longer than the model's max_position_embeddings=256") for w in checked.warnings)


def test_finetune_seqlen_whose_logits_alone_exceed_memory_is_refused(monkeypatch, llama_dir, data_root):
    available = 2**30
    monkeypatch.setattr("prunelab.runner.available_memory", lambda device: available)
    vocab = LlamaConfig.from_pretrained(llama_dir).vocab_size
    too_long = available // (vocab * 4) + 1  # its float32 logits alone take more than what is free
    message = _refused(llama_dir, data_root, "finetune=masked", f"finetune.seqlen={too_long}", "eval.perplexity.seqlen=64")
    assert f"finetune.seqlen={too_long}" in message and "GiB available" in message
    _check(llama_dir, data_root, "finetune=masked", "finetune.seqlen=256", "eval.perplexity.seqlen=64")


def test_finetune_seqlen_beyond_the_corpus_tokens_is_refused(tmp_path, llama_dir, data_root, default_tokenizer):
    text = "Pruning removes weights from a network. " * 8
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    fits = _tokens(default_tokenizer, text) + 1  # pack_windows appends one EOS per document
    args = ("finetune=masked", "finetune.corpus=files", f"finetune.files=[{corpus}]", "eval.perplexity.seqlen=64")
    _check(llama_dir, data_root, *args, f"finetune.seqlen={fits}")
    message = _refused(llama_dir, data_root, *args, f"finetune.seqlen={fits + 1}")
    assert f"fewer than finetune.seqlen={fits + 1} tokens" in message


def test_the_real_finetune_seqlen_100000_is_refused_before_loading(monkeypatch, data_root):
    monkeypatch.setattr("prunelab.runner.available_memory", lambda device: 32 * 2**30)
    with pytest.raises(ConfigError, match=r"finetune.seqlen=100000 .* GiB available"):
        preflight(_compose("finetune=masked", "finetune.seqlen=100000", f"data_root={data_root}", "logger=none"))


# -------------------------------------------------------------------------------------------- 3: calib.seqlen

@pytest.fixture
def short_c4_root(tmp_path, data_root) -> Path:
    """A data root whose C4 calibration documents (1100+) are a few short texts."""
    root = tmp_path / "data"
    rows = [f"evaluation document {i}" for i in range(C4_EVAL_DOCS)]
    rows += ["A short calibration text.", "Sparse networks keep the weights that matter most for the loss. " * 5,
             "Another document, of middling length, about pruning. " * 2]
    _write_text_parquet(root / C4_VALIDATION, rows)
    (root / WIKITEXT2_TEST).parent.mkdir(parents=True)
    (root / WIKITEXT2_TEST).symlink_to(data_root / WIKITEXT2_TEST)
    return root


def test_calib_seqlen_longer_than_every_calibration_document_is_refused(llama_dir, short_c4_root, default_tokenizer):
    documents = pq.read_table(short_c4_root / C4_VALIDATION).column("text").to_pylist()[C4_EVAL_DOCS:]
    longest = max(_tokens(default_tokenizer, d) for d in documents)  # a window needs a document longer than seqlen
    args = ("method=wanda", "calib.nsamples=2", "eval.perplexity.seqlen=64")
    _check(llama_dir, short_c4_root, *args, f"calib.seqlen={longest - 1}")
    message = _refused(llama_dir, short_c4_root, *args, f"calib.seqlen={longest}")
    assert "no document of C4" in message and f"calib.seqlen={longest}" in message


def test_calib_seqlen_beyond_the_real_c4_documents_is_refused(data_root):
    with pytest.raises(ConfigError, match=r"no document of C4 .* calib.seqlen=100000"):
        preflight(_compose("method=wanda", "calib.seqlen=100000", "calib.nsamples=1", f"data_root={data_root}", "logger=none"))


# ---------------------------------------------------------------------------------------------- 4: perplexity

@pytest.mark.parametrize("overrides,needle", [
    (["eval.perplexity.seqlen=1"], "eval.perplexity.seqlen=1 leaves no token to predict"),
    (["eval.perplexity.datasets=[]"], "eval.perplexity.datasets=[] with eval.perplexity.enabled=true"),
    (["eval.perplexity.max_windows=0"], "eval.perplexity.max_windows=0"),
])
def test_perplexity_settings_that_give_no_number_are_refused(llama_dir, data_root, overrides, needle):
    assert needle in _refused(llama_dir, data_root, *overrides)


def test_no_perplexity_at_all_stays_a_valid_run(llama_dir, data_root):
    _check(llama_dir, data_root, "eval=none")
    _check(llama_dir, data_root, "eval.perplexity.enabled=false", "eval.perplexity.datasets=[]")


def test_perplexity_seqlen_longer_than_the_token_stream_is_refused(tmp_path, llama_dir, default_tokenizer):
    root = tmp_path / "data"
    rows = [" = Pruning = ", "", " Pruning removes weights that matter little . " * 3, " It keeps the rest . "]
    _write_text_parquet(root / WIKITEXT2_TEST, rows)
    numel = _tokens(default_tokenizer, "\n\n".join(rows))  # the WikiText-2 protocol's stream
    _check(llama_dir, root, f"eval.perplexity.seqlen={numel}")  # exactly one window
    message = _refused(llama_dir, root, f"eval.perplexity.seqlen={numel + 1}")
    assert f"eval.perplexity.seqlen={numel + 1} is longer than the whole wikitext2 evaluation stream" in message


# ------------------------------------------------------------------------------------- 5: SparseGPT blocksize

@pytest.mark.parametrize("pattern,blocksize,ok", [("2:4", 10, False), ("2:4", 12, True), ("4:8", 12, False), ("4:8", 16, True)])
def test_sparsegpt_blocksize_must_hold_whole_nm_groups(llama_dir, data_root, pattern, blocksize, ok):
    args = ("method=sparsegpt", f"pattern={pattern}", f"method.params.blocksize={blocksize}", "calib.seqlen=64",
            "eval.perplexity.seqlen=64")
    if ok:
        _check(llama_dir, data_root, *args)
    else:
        m = int(pattern.split(":")[1])
        assert f"method.params.blocksize={blocksize} must be a multiple of M={m}" in _refused(llama_dir, data_root, *args)


# --------------------------------------------------------------------------------------------------- 6: OWL

@pytest.mark.parametrize("overrides,needle", [
    (["allocation.m=0"], "allocation.m=0.0 must be positive"),
    (["allocation.m=-5"], "allocation.m=-5.0 must be positive"),
    (["allocation.lam=0.6"], "allocation.lam=0.6 must lie in [0, 0.5)"),
])
def test_owl_knobs_that_cannot_work_are_refused(llama_dir, data_root, overrides, needle):
    assert needle in _refused(llama_dir, data_root, "method=wanda", "allocation=owl", *overrides)


def _owl_fits_for_some_ratios(sparsity: float, lam: float, layers: int) -> bool:
    """Brute force with the allocation itself: ratios 0 and 1 at the ends, the others on a grid."""
    grid = [i / 50 for i in range(51)]
    vectors = [[0.0, 1.0] + [x] * (layers - 2) for x in grid] + [[0.0] + [1.0] * (layers - 1)]
    for ratios in vectors:
        try:
            allocation.owl(ratios, sparsity, lam)
            return True
        except ValueError:
            continue
    return False


@pytest.mark.parametrize("sparsity,lam", [(0.05, 0.1), (0.1, 0.1), (0.85, 0.1), (0.95, 0.1), (0.03, 0.06), (0.05, 0.06),
                                          (0.0, 0.01), (0.7, 0.08), (0.9, 0.08)])
@pytest.mark.parametrize("model", ["llama_dir", "mha_dir"])  # 2 and 3 decoder layers
def test_owl_lam_is_refused_exactly_when_no_outlier_ratios_could_fit_it(request, data_root, model, sparsity, lam):
    model_dir = request.getfixturevalue(model)
    layers = LlamaConfig.from_pretrained(model_dir).num_hidden_layers
    args = ("method=wanda", "allocation=owl", f"sparsity={sparsity}", f"allocation.lam={lam}", "calib.seqlen=64",
            "eval.perplexity.seqlen=64")
    if _owl_fits_for_some_ratios(sparsity, lam, layers):
        _check(model_dir, data_root, *args)
    else:
        assert "whatever the outlier ratios" in _refused(model_dir, data_root, *args)


def test_owl_lam_that_fails_for_some_outlier_ratios_is_a_warning(mha_dir, data_root):
    sparsity, lam = 0.05, 0.06
    assert _owl_fits_for_some_ratios(sparsity, lam, 3)
    with pytest.raises(ValueError):  # but ratios that put a layer's target below 0 stop the allocation
        allocation.owl([0.0, 0.0, 1.0], sparsity, lam)
    checked = _check(mha_dir, data_root, "method=wanda", "allocation=owl", f"sparsity={sparsity}", f"allocation.lam={lam}",
                     "calib.seqlen=64", "eval.perplexity.seqlen=64")
    assert any(w.startswith("allocation=owl:") for w in checked.warnings)


# ------------------------------------------------------------------------------------- 7: prune.targets / skip

@pytest.mark.parametrize("overrides,needle", [
    (["prune.targets=['(']"], "prune.targets: '(' is not a valid regular expression"),
    (["prune.skip=['[a-']"], "prune.skip: '[a-' is not a valid regular expression"),
    (["prune.targets=['']"], "prune.targets=[''] holds an empty regex"),
    (["prune.skip=['']"], "prune.skip=[''] holds an empty regex"),
    (["prune.targets=[]"], "prune.targets=[] selects no module"),
    (["prune.targets=[dwn_proj]"], "prune.targets: 'dwn_proj' matches no Linear module inside a decoder layer"),
    (["prune.targets=[q_proj,dwn_proj]"], "'dwn_proj' matches no Linear module"),
    (["prune.skip=[lm_head]"], "prune.skip: 'lm_head' matches no prunable module"),
    (["prune.targets=[q_proj]", "prune.skip=[q_proj]"], "select no module"),
])
def test_prune_regexes_that_cannot_select_are_refused(llama_dir, data_root, overrides, needle):
    assert needle in _refused(llama_dir, data_root, "method=magnitude", *overrides)


def test_prune_regexes_that_select_some_modules_pass(llama_dir, data_root):
    _check(llama_dir, data_root, "method=magnitude", "prune.targets=[mlp,q_proj]", "prune.skip=['layers\\.0\\.mlp']")


# ------------------------------------------------------------------------------------------------- 8: latency

@pytest.mark.parametrize("overrides,needle", [
    (["eval.latency.decode_tokens=1"], "eval.latency.decode_tokens=1 must be >= 2"),
    (["eval.latency.repeats=0"], "eval.latency.repeats=0 must be >= 1"),
    (["eval.latency.prefill_lengths=[]"], "eval.latency.prefill_lengths=[]"),
])
def test_latency_settings_that_cannot_measure_are_refused(llama_dir, data_root, overrides, needle):
    assert needle in _refused(llama_dir, data_root, "eval.latency.enabled=true", "eval.perplexity.seqlen=64", *overrides)


# ----------------------------------------------------------------------------------------- 9: fine-tuning files

@pytest.mark.parametrize("name,content,needle", [
    ("latin1.txt", "caf\xe9 ".encode("latin-1") * 100, "is neither a .parquet file nor UTF-8 text"),
    ("weights.bin", b"\x00\x01\x02\x03" * 100, "holds NUL bytes"),
    ("broken.parquet", b"PAR1 not really", "is not a readable parquet file"),
])
def test_finetune_files_that_are_not_text_or_parquet_are_refused(tmp_path, llama_dir, data_root, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    message = _refused(llama_dir, data_root, "finetune=masked", "finetune.corpus=files", f"finetune.files=[{path}]",
                       "eval.perplexity.seqlen=64")
    assert message.startswith("finetune.files:") and needle in message


def test_finetune_files_of_text_and_parquet_pass(tmp_path, llama_dir, data_root):
    text, table = tmp_path / "notes.txt", tmp_path / "docs.parquet"
    text.write_text("Pruned weights stay zero while the rest train. " * 40)
    _write_text_parquet(table, ["A parquet document about sparse training. " * 40])
    _check(llama_dir, data_root, "finetune=masked", "finetune.corpus=files", f"finetune.files=[{text},{table}]",
           "finetune.seqlen=64", "eval.perplexity.seqlen=64")


# --------------------------------------------------------------------------------------------- 10: safetensors

def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4)}, str(path))


@pytest.mark.parametrize("damage,needle", [
    ("junk", "does not start with a safetensors header length"),
    ("json", "has no JSON safetensors header"),
    ("truncated", "is cut short"),
])
def test_a_model_folder_with_damaged_safetensors_is_refused(llama_dir, data_root, damage, needle):
    path = llama_dir / "model.safetensors"
    if damage == "junk":
        path.write_bytes(b"this is not a safetensors file at all")
    elif damage == "json":
        header = b"{not json"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
    else:
        _safetensors(path)
        path.write_bytes(path.read_bytes()[:-10])
    message = _refused(llama_dir, data_root, "eval.perplexity.seqlen=64")
    assert str(path) in message and needle in message


def test_a_model_folder_with_whole_safetensors_passes(llama_dir, data_root):
    _safetensors(llama_dir / "model.safetensors")
    _check(llama_dir, data_root, "eval.perplexity.seqlen=64")


# --------------------------------------------------------------------------------------------------- 11: seeds

@pytest.mark.parametrize("override,key", [
    (f"seed={2**63}", "seed"),
    (f"calib.seed={-(2**63) - 1}", "calib.seed"),
    (f"finetune.seed={2**64}", "finetune.seed"),
    (f"method.params.seed={2**70}", "method.params.seed"),
])
def test_seeds_outside_int64_are_refused(llama_dir, data_root, override, key):
    message = _refused(llama_dir, data_root, "method=random", override)
    assert message.startswith(f"{key}=") and "64-bit seed" in message


def test_seeds_at_the_int64_ends_pass(llama_dir, data_root):
    _check(llama_dir, data_root, "method=random", f"seed={2**63 - 1}", f"calib.seed={-(2**63)}", "eval.perplexity.seqlen=64")


# ------------------------------------------------------------------------------------ 12: structured heads

@pytest.mark.parametrize("model,fraction,ok", [
    ("mha_dir", 0.9, False),   # round(4 x 0.9) = 4: every head of a layer
    ("mha_dir", 0.6, True),    # round(2.4) = 2
    ("llama_dir", 0.8, False),  # GQA, 2 query heads per KV group: round(1.6) = 2, the whole group
    ("llama_dir", 0.5, True),
])
def test_a_heads_fraction_that_removes_every_head_is_refused(request, data_root, model, fraction, ok):
    model_dir = request.getfixturevalue(model)
    config = LlamaConfig.from_pretrained(model_dir)
    per_group = config.num_attention_heads // config.num_key_value_heads
    whole = config.num_attention_heads if per_group == 1 else per_group
    assert (round(whole * fraction) < whole) == ok  # what the expectation rests on
    args = ("structure=heads", "structure.score=magnitude", f"structure.fraction={fraction}", "eval.perplexity.seqlen=64")
    if ok:
        _check(model_dir, data_root, *args)
    else:
        assert f"structure.fraction={fraction} removes {whole} of the {whole}" in _refused(model_dir, data_root, *args)


# ------------------------------------------------------------------------------------------------ 13: cache_dir

def test_an_empty_cache_dir_is_refused(llama_dir, data_root):
    assert "cache_dir='' names no folder" in _refused(llama_dir, data_root, "cache_dir=''")


# ----------------------------------------------------------------------------------------------- 14: LoRA alpha

@pytest.mark.parametrize("alpha", ["-16", "0"])
def test_a_lora_alpha_that_is_not_positive_is_refused(llama_dir, data_root, alpha):
    message = _refused(llama_dir, data_root, "finetune=lora", f"finetune.lora.alpha={alpha}", "eval.perplexity.seqlen=64")
    assert message.startswith(f"finetune.lora.alpha={float(alpha)} must be positive")


# ---------------------------------------------------------------------------- 15: settings recorded, never applied

@pytest.mark.parametrize("overrides,needle", [
    (["method=dense", "pattern=2:4"], "pattern=2:4 is never applied: method=dense prunes nothing"),
    (["structure=neurons", "pattern=2:4"], "pattern=2:4 is never applied: structure=neurons removes whole units"),
    (["method=dense", "allocation=owl"], "allocation=owl is never applied"),
    (["structure=neurons", "allocation=explicit"], "allocation=explicit is never applied"),
    (["method=dense", "+method.params.percdamp=0.1"], "method.params={'percdamp': 0.1} is never applied"),
])
def test_pruning_settings_a_run_never_applies_are_refused(llama_dir, data_root, overrides, needle):
    assert needle in _refused(llama_dir, data_root, "eval.perplexity.seqlen=64", *overrides)


@pytest.mark.parametrize("overrides", [["method=dense"], ["structure=neurons", "structure.score=magnitude"]])
def test_a_non_default_sparsity_on_a_run_that_prunes_no_weights_is_a_recorded_warning(llama_dir, data_root, overrides):
    quiet = _check(llama_dir, data_root, "eval.perplexity.seqlen=64", *overrides)
    assert not [w for w in quiet.warnings if w.startswith("sparsity=")]  # the composed default says nothing
    noted = _check(llama_dir, data_root, "eval.perplexity.seqlen=64", "sparsity=0.9", *overrides)
    assert [w for w in noted.warnings if w.startswith("sparsity=0.9 is not applied")]


def test_an_experiment_whose_dense_row_shares_the_sparsity_still_validates():
    validate(_compose("experiment=owl-table", "method=dense"))  # sparsity: 0.7 for every job of the table
