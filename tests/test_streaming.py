"""Pruning from disk, one decoder layer in memory (``prune_streamed``, ``model.stream=true``).

The reference is the in-memory engine on the same checkpoint: the streamed output must hold the
same tensors bit for bit, load with plain ``from_pretrained``, and never have two layers resident.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunelab.io.shards import INDEX, ShardError, ShardReader
from prunelab.models import streaming
from prunelab.prune.engine import prune_model, prune_streamed
from prunelab.prune.methods import build_method
from prunelab.prune.summary import measure_sparsity
from tiny_models import BUILDERS, random_ids, tiny_llama


def _save(model, folder, shard="30KB"):
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _in_memory(folder, method, ids, sparsity, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder)
    report = prune_model(model, build_method(method, {}), ids, sparsity, **kwargs)
    return model, report


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype for k in sa)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different[:4]}"


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "unstructured"),
                                            ("magnitude", "unstructured"), ("sparsegpt", "2:4")])
def test_streamed_pruning_writes_what_the_in_memory_engine_computes(tmp_path, method, pattern):
    source = _save(tiny_llama(num_hidden_layers=3), tmp_path / "src")
    ids = random_ids(4, 16)
    reference, ref_report = _in_memory(source, method, ids, 0.5, pattern=pattern)
    report = prune_streamed(source, tmp_path / "out", build_method(method, {}), ids, 0.5, pattern)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers, from the shards
    _same_tensors(reference, pruned)
    # the report was measured layer by layer while each was resident; measure the loaded output now
    measured = measure_sparsity(pruned, pattern=pattern)
    assert report.summary.per_module == pytest.approx(measured.per_module)
    assert report.summary.model_fraction == pytest.approx(measured.model_fraction)
    assert report.summary.overall == pytest.approx(ref_report.summary.overall)
    assert report.summary.nm_ok and report.streamed["shards"] == 3 + 3  # layers; embeddings, norm, head
    assert report.layer_forwards == ref_report.layer_forwards
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "gpt2", "opt"])
def test_streaming_covers_every_supported_family(tmp_path, family):
    source = _save(BUILDERS[family](), tmp_path / "src")
    ids = random_ids(2, 16)
    reference, _ = _in_memory(source, "wanda", ids, 0.5)
    prune_streamed(source, tmp_path / "out", build_method("wanda", {}), ids, 0.5)
    _same_tensors(reference, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def test_at_most_one_layer_is_in_memory_and_owl_reads_without_writing(tmp_path, monkeypatch):
    """OWL's pre-pass walks the layers too: it must read each one, write none, and leave it on meta."""
    source = _save(tiny_llama(num_hidden_layers=4), tmp_path / "src")
    ids = random_ids(4, 16)
    real_layers = []  # per load: how many decoder layers held real (non-meta) weights just before
    writes = []
    load, release = streaming.StreamedLayers.load, streaming.StreamedLayers.release

    def counting_load(self, index, layer):
        real_layers.append(sum(any(p.device.type != "meta" for p in lay.parameters()) for lay in self.streamed.adapter.layers))
        load(self, index, layer)

    def counting_release(self, index, layer, write):
        writes.append((index, write))
        release(self, index, layer, write)

    monkeypatch.setattr(streaming.StreamedLayers, "load", counting_load)
    monkeypatch.setattr(streaming.StreamedLayers, "release", counting_release)
    allocation = {"name": "owl", "lam": 0.1, "m": 2.0}
    reference, ref_report = _in_memory(source, "wanda", ids, 0.6, allocation=allocation)
    report = prune_streamed(source, tmp_path / "out", build_method("wanda", {}), ids, 0.6, allocation=allocation)
    assert real_layers == [0] * 8  # 4 pre-pass loads + 4 pruning loads, each onto an all-meta stack
    assert writes == [(i, False) for i in range(4)] + [(i, True) for i in range(4)]
    assert report.outlier_ratios == pytest.approx(ref_report.outlier_ratios)
    assert report.layer_targets == pytest.approx(ref_report.layer_targets)
    _same_tensors(reference, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def test_a_tied_single_file_checkpoint_streams(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "src")  # one model.safetensors, no lm_head tensor
    assert (tmp_path / "src" / "model.safetensors").is_file() and not (tmp_path / "src" / INDEX).exists()
    ids = random_ids(2, 16)
    reference, _ = _in_memory(tmp_path / "src", "wanda", ids, 0.5)
    prune_streamed(tmp_path / "src", tmp_path / "out", build_method("wanda", {}), ids, 0.5)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _same_tensors(reference, pruned)
    assert "lm_head.weight" not in ShardReader(tmp_path / "out").names()


class _Boom(RuntimeError):
    pass


def test_an_interrupted_stream_leaves_no_loadable_output(tmp_path):
    source = _save(tiny_llama(num_hidden_layers=3), tmp_path / "src")
    method = build_method("magnitude", {})
    calls = []
    original = method.prune

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8:  # during the second layer
            raise _Boom("killed")
        return original(*args, **kwargs)

    method.prune = failing
    with pytest.raises(_Boom):
        prune_streamed(source, tmp_path / "out", method, None, 0.5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-00001-of-00006.safetensors",
                                                                    streaming.PROGRESS]
    with pytest.raises(ShardError, match="neither"):
        ShardReader(tmp_path / "out")
    with pytest.raises((OSError, ValueError)):  # no config.json, no index: nothing to load
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prune_streamed(source, tmp_path / "done", build_method("magnitude", {}), None, 0.5)
    with pytest.raises(FileExistsError):  # a finished output is never overwritten
        prune_streamed(source, tmp_path / "done", build_method("magnitude", {}), None, 0.5)


def _dies_after(method, calls: int):
    """``method`` whose prune raises on its call number ``calls + 1`` (a run killed part way)."""
    done = []
    original = method.prune

    def prune(*args, **kwargs):
        done.append(1)
        if len(done) > calls:
            raise _Boom("killed")
        return original(*args, **kwargs)

    method.prune = prune
    return method, done


@pytest.mark.parametrize("method,engine,allocation", [
    ("sparsegpt", {}, None), ("wanda", {"sequential": False}, {"name": "owl", "lam": 0.08, "m": 5}),
    ("magnitude", {}, None)])
def test_a_killed_stream_resumes_where_it_stopped_and_writes_the_same_model(tmp_path, method, engine, allocation):
    source = _save(tiny_llama(num_hidden_layers=3), tmp_path / "src")
    ids = random_ids(2, 16) if method != "magnitude" else None
    per_layer = 7  # q, k, v, o, gate, up, down
    reference = prune_streamed(source, tmp_path / "ref", build_method(method, {}), ids, 0.5, allocation=allocation, engine=engine)

    dying, _ = _dies_after(build_method(method, {}), 2 * per_layer + 3)  # killed inside the third layer
    with pytest.raises(_Boom):
        prune_streamed(source, tmp_path / "out", dying, ids, 0.5, allocation=allocation, engine=engine)
    assert not (tmp_path / "out" / INDEX).exists()
    counting, calls = _dies_after(build_method(method, {}), 10**6)
    report = prune_streamed(source, tmp_path / "out", counting, ids, 0.5, allocation=allocation, engine=engine)

    assert len(calls) == per_layer, "only the unfinished layer is pruned again"
    assert report.streamed["resumed_layers"] == 2 and reference.streamed["resumed_layers"] == 0
    assert not (tmp_path / "out" / streaming.PROGRESS).exists()
    _same_tensors(AutoModelForCausalLM.from_pretrained(tmp_path / "ref"), AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert report.summary.per_module == reference.summary.per_module
    assert report.summary.per_layer == reference.summary.per_layer and report.summary.model_fraction == reference.summary.model_fraction
    assert [(r.name, r.target, r.achieved) for r in report.modules] == [(r.name, r.target, r.achieved) for r in reference.modules]
    assert report.streamed["bytes_written"] == reference.streamed["bytes_written"]


def test_a_resume_trusts_only_verified_layers_of_the_same_run(tmp_path):
    source = _save(tiny_llama(num_hidden_layers=3), tmp_path / "src")
    ids = random_ids(2, 16)

    def killed(out, sparsity=0.5):
        dying, _ = _dies_after(build_method("sparsegpt", {}), 2 * 7 + 1)
        with pytest.raises(_Boom):
            prune_streamed(source, out, dying, ids, sparsity)

    killed(tmp_path / "a")
    shard = tmp_path / "a" / "model-00002-of-00006.safetensors"  # layer 1's
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))  # changed on disk after it was recorded
    counting, calls = _dies_after(build_method("sparsegpt", {}), 10**6)
    report = prune_streamed(source, tmp_path / "a", counting, ids, 0.5)
    assert report.streamed["resumed_layers"] == 1 and len(calls) == 2 * 7

    killed(tmp_path / "b")  # then re-run with another sparsity: nothing is taken over
    counting, calls = _dies_after(build_method("sparsegpt", {}), 10**6)
    report = prune_streamed(source, tmp_path / "b", counting, ids, 0.6)
    assert report.streamed["resumed_layers"] == 0 and len(calls) == 3 * 7
    prune_streamed(source, tmp_path / "fresh", build_method("sparsegpt", {}), ids, 0.6)
    _same_tensors(AutoModelForCausalLM.from_pretrained(tmp_path / "fresh"), AutoModelForCausalLM.from_pretrained(tmp_path / "b"))
    prune_streamed(source, tmp_path / "ref", build_method("sparsegpt", {}), ids, 0.5)
    _same_tensors(AutoModelForCausalLM.from_pretrained(tmp_path / "ref"), AutoModelForCausalLM.from_pretrained(tmp_path / "a"))


def test_a_checkpoint_missing_a_tensor_is_refused_before_pruning(tmp_path):
    source = _save(tiny_llama(), tmp_path / "src")
    index = json.loads((source / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (source / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match="no tensor for model.norm.weight"):
        prune_streamed(source, tmp_path / "out", build_method("magnitude", {}), None, 0.5)
    assert not (tmp_path / "out").exists()


def test_the_cli_streams_a_local_model_into_the_run_folder(tmp_path, cache_dir, data_root, tiny_hf_dir, default_tokenizer):
    from prunelab.data.calibration import get_calibration
    from test_cli import run_cli

    run_dir = tmp_path / "run"
    calib = {"source": "c4", "nsamples": 2, "seqlen": 64, "seed": 0}
    proc = run_cli("model=hf", f"model.path={tiny_hf_dir}", "model.stream=true", "method=sparsegpt", "eval=stream",
                   "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=3",
                   *(f"calib.{k}={v}" for k, v in calib.items()), "logger=none", f"hydra.run.dir={run_dir}",
                   cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["model_source"]["stream"] == str(tiny_hf_dir)
    assert results["metrics"]["pruning"]["streamed"]["resident_layers_max"] == 1
    assert results["metrics"]["sparsity"]["overall"] == pytest.approx(0.5)
    # the same pruning in memory, on the same calibration windows
    ids, _ = get_calibration(default_tokenizer, calib, data_root, cache_dir)
    reference, _ = _in_memory(tiny_hf_dir, "sparsegpt", ids, 0.5)
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    _same_tensors(reference, pruned)
    assert (run_dir / "model" / "tokenizer.json").is_file()
    # the layer-by-layer perplexity of the written model equals the in-memory one on the same windows
    from prunelab.data import sources
    from prunelab.data.tokens import eval_stream
    from prunelab.eval.perplexity import perplexity

    scored = results["metrics"]["perplexity"]["wikitext2"]
    stream = eval_stream(sources.eval_source("wikitext2", str(data_root)), default_tokenizer, 64)
    expected = perplexity(pruned, stream, 64, max_windows=3)
    assert scored["streamed"] and scored["windows"] == 3 and scored["fingerprint"] == expected["fingerprint"]
    assert scored["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)


def test_the_cli_takes_up_a_killed_stream_in_its_run_folder(tmp_path, cache_dir, data_root, tiny_hf_dir, default_tokenizer):
    from prunelab.data.calibration import get_calibration
    from test_cli import run_cli

    run_dir = tmp_path / "run"
    calib = {"source": "c4", "nsamples": 2, "seqlen": 64, "seed": 0}
    ids, _ = get_calibration(default_tokenizer, calib, data_root, cache_dir)
    per_layer = len(streaming.open_streamed(tiny_hf_dir).adapter.prunable_modules(0))
    dying, _ = _dies_after(build_method("sparsegpt", {}), per_layer + 2)  # the first attempt dies in layer 1
    with pytest.raises(_Boom):
        prune_streamed(tiny_hf_dir, run_dir / "model", dying, ids, 0.5)
    proc = run_cli("model=hf", f"model.path={tiny_hf_dir}", "model.stream=true", "method=sparsegpt", "eval=none",
                   *(f"calib.{k}={v}" for k, v in calib.items()), "logger=none", f"hydra.run.dir={run_dir}",
                   cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["metrics"]["pruning"]["streamed"]["resumed_layers"] == 1
    reference, _ = _in_memory(tiny_hf_dir, "sparsegpt", ids, 0.5)
    _same_tensors(reference, AutoModelForCausalLM.from_pretrained(run_dir / "model"))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method=wanda"], "use eval=stream"),
        (["method=wanda", "eval=zeroshot"], "cannot run zeroshot, size"),
        (["method=dense", "eval=none"], "choose a method"),
        (["method=magnitude", "eval=none", "finetune=masked"], "finetune=masked"),
        (["method=magnitude", "eval=none", "prune.save_masks=true"], "prune.save_masks=false"),
        (["method=wanda", "eval=none", "model=hf", "model.path=some-org/some-model"], "local folder"),
        (["method=magnitude", "method.params.scope=global", "eval=none"], "scope=layer"),
    ],
)
def test_stream_settings_that_cannot_work_fail_before_loading(overrides, needle):
    from test_config import _compose

    from prunelab.config.schema import ConfigError, validate

    with pytest.raises(ConfigError, match=needle):
        validate(_compose("model.stream=true", *overrides))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_streamed_perplexity_equals_the_in_memory_one(tmp_path, family):
    """Layer by layer from disk, then the model's own norm, head and soft-capping: the same NLLs."""
    from prunelab.data.tokens import TokenStream
    from prunelab.eval.perplexity import perplexity, perplexity_streamed

    model = BUILDERS[family]()
    if family == "gemma3":
        model.config.final_logit_softcapping = 5.0  # the head's soft-capping must run too
    source = _save(model, tmp_path / "src")
    stream = TokenStream("toy", random_ids(1, 5 * 24 + 7, seed=3), "toy protocol", "test")
    expected = perplexity(AutoModelForCausalLM.from_pretrained(source), stream, 24, max_windows=4, batch_size=2)
    got = perplexity_streamed(source, stream, 24, max_windows=4, batch_size=2)
    assert got["window_mean_nll"] == pytest.approx(expected["window_mean_nll"], rel=1e-5)
    assert {k: v for k, v in got.items() if k not in ("window_mean_nll", "ppl", "mean_nll", "streamed")} == \
        {k: v for k, v in expected.items() if k not in ("window_mean_nll", "ppl", "mean_nll")}


def test_released_layers_leave_memory(tmp_path, monkeypatch):
    """No reference keeps a released layer's tensors alive: each is freed before the next layer loads."""
    import gc
    import weakref

    source = _save(tiny_llama(num_hidden_layers=3), tmp_path / "src")
    alive_at_load = []
    refs: list = []
    load = streaming.StreamedLayers.load

    def watching_load(self, index, layer):
        gc.collect()
        alive_at_load.append(sum(ref() is not None for ref in refs))
        load(self, index, layer)
        refs.extend(weakref.ref(p) for p in layer.parameters())
        refs.extend(weakref.ref(p.data) for p in layer.parameters())

    trims = []
    monkeypatch.setattr(streaming.StreamedLayers, "load", watching_load)
    monkeypatch.setattr(streaming, "_trim_heap", lambda: trims.append(1))
    prune_streamed(source, tmp_path / "out", build_method("sparsegpt", {}), random_ids(2, 16), 0.5)
    gc.collect()
    assert alive_at_load == [0, 0, 0] and all(ref() is None for ref in refs)
    assert len(trims) == 3, "the C heap is trimmed after every layer leaves"
    streaming._trim_heap()  # the real one runs (a no-op where there is no glibc)


@pytest.mark.parametrize("tied", [True, False])
def test_the_embeddings_leave_memory_once_layer_0s_inputs_are_captured(tmp_path, monkeypatch, tied):
    source = _save(tiny_llama(tie_word_embeddings=tied), tmp_path / "src")
    seen = []
    load = streaming.StreamedLayers.load

    def watching_load(self, index, layer):
        model = self.streamed.model
        seen.append((model.get_input_embeddings().weight.device.type, model.get_output_embeddings().weight.device.type))
        load(self, index, layer)

    monkeypatch.setattr(streaming.StreamedLayers, "load", watching_load)
    prune_streamed(source, tmp_path / "out", build_method("wanda", {}), random_ids(2, 16), 0.5)
    assert seen == [("meta", "meta")] * 3, "a tied head must not keep the embedding matrix alive either"


def test_a_checkpoint_without_the_base_model_prefix_streams(tmp_path):
    """Older checkpoints (GPT-2's on the hub) store 'h.0...' where the model says 'transformer.h.0...'."""
    from safetensors.torch import load_file, save_file

    model = BUILDERS["gpt2"]()
    model.save_pretrained(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in state.items()}, str(tmp_path / "src" / "model.safetensors"),
              metadata={"format": "pt"})
    ids = random_ids(2, 16)
    reference = copy.deepcopy(model)
    prune_model(reference, build_method("wanda", {}), ids, 0.5)
    prune_streamed(tmp_path / "src", tmp_path / "out", build_method("wanda", {}), ids, 0.5)
    _same_tensors(reference, AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def test_a_bf16_checkpoint_is_pruned_in_the_dtype_asked_for(tmp_path):
    source = _save(tiny_llama().to(torch.bfloat16), tmp_path / "src")
    ids = random_ids(2, 16)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    prune_model(reference, build_method("wanda", {}), ids, 0.5)
    prune_streamed(source, tmp_path / "out", build_method("wanda", {}), ids, 0.5, dtype=torch.float32)
    _same_tensors(reference, AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_a_broken_nm_pattern_leaves_no_loadable_output(tmp_path):
    source = _save(tiny_llama(), tmp_path / "src")
    method = build_method("magnitude", {})
    original = method.prune

    def leaky(weight, stats, sparsity, pattern, **kwargs):
        result = original(weight, stats, sparsity, pattern, **kwargs)
        result.weight[0, :4] = 1.0  # one group of four with no zero
        return result

    method.prune = leaky
    with pytest.raises(RuntimeError, match="N:M check failed"):
        prune_streamed(source, tmp_path / "out", method, None, 0.5, "2:4")
    assert not (tmp_path / "out" / INDEX).exists()
