"""Structured pruning end to end on a tiny Llama: the plan removes the units the scores rank lowest,
FLAP's bias keeps the mean output, Taylor uses the real loss gradients, layer plans follow their scores."""

from __future__ import annotations

import pytest
import torch

from prunelab.models import surgery
from prunelab.prune.structured import pipeline
from prunelab.prune.structured.collect import layer_scores

VOCAB = 64


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _calib():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


def test_magnitude_neurons_remove_the_lowest_norm_neurons_of_each_layer():
    model = _model()
    expected = []
    for layer in model.model.layers:
        mlp = layer.mlp
        norms = [(mlp.gate_proj.weight[i].pow(2).sum() + mlp.up_proj.weight[i].pow(2).sum()
                  + mlp.down_proj.weight[:, i].pow(2).sum()).item() for i in range(48)]
        expected.append(sorted(sorted(range(48), key=norms.__getitem__)[:12]))
    scores = pipeline.unit_scores(model, "neurons", "magnitude")
    plan = pipeline.plan_units(model, "neurons", "magnitude", 0.25, scores)
    assert plan.removed == expected
    assert pipeline.apply_plan(model, plan) is True
    assert model.config.intermediate_size == 36 and all(l.mlp.down_proj.in_features == 36 for l in model.model.layers)


def test_flap_bias_keeps_the_layers_mean_output_on_the_calibration_set():
    model = _model()
    calib = _calib()
    stats = pipeline.channel_stats(model, calib, "neurons")
    scores = pipeline.unit_scores(model, "neurons", "flap", stats=stats)
    plan = pipeline.plan_units(model, "neurons", "flap", 0.5, scores, protect=[1, 2, 3], stats=stats)
    def mean_output_of_layer_0_mlp():
        outputs = []
        hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: outputs.append(out))
        with torch.no_grad():
            model(input_ids=calib, use_cache=False)  # layer 0 sees the same embeddings before and after
        hook.remove()
        return outputs[0].reshape(-1, 32).mean(0)

    dense_mean = mean_output_of_layer_0_mlp()
    assert pipeline.apply_plan(model, plan) is False  # Llama's down_proj has no bias: not a standard config
    pruned_mean = mean_output_of_layer_0_mlp()
    assert model.model.layers[0].mlp.down_proj.in_features == 24
    torch.testing.assert_close(pruned_mean, dense_mean, rtol=1e-4, atol=1e-5)


def test_taylor_scores_use_the_gradient_of_the_calibration_loss():
    model = _model()
    calib = _calib()
    grads = pipeline.taylor_gradients(model, calib, batch_size=2)
    model.zero_grad()
    for batch in calib.split(2):  # the same sum of gradients, taken by hand
        model(input_ids=batch, labels=batch).loss.backward()
    o = model.model.layers[2].self_attn.o_proj
    q = model.model.layers[2].self_attn.q_proj
    scores = pipeline.unit_scores(model, "heads", "taylor", grads=grads)
    for head in range(4):
        block = slice(head * 8, (head + 1) * 8)
        want = (q.weight[block] * q.weight.grad[block]).abs().sum() + (o.weight[:, block] * o.weight.grad[:, block]).abs().sum()
        assert scores[2][head].item() == pytest.approx(want.item(), rel=1e-4)


def test_wanda_heads_remove_one_query_head_per_kv_group():
    model = _model()
    stats = pipeline.channel_stats(model, _calib(), "heads")
    scores = pipeline.unit_scores(model, "heads", "wanda", stats=stats)
    plan = pipeline.plan_units(model, "heads", "wanda", 0.5, scores)
    for layer, removed in enumerate(plan.removed):
        assert len(removed) == 2 and {h // 2 for h in removed} == {0, 1}  # one from each group
        assert removed == [min((0, 1), key=lambda h: scores[layer][h]), min((2, 3), key=lambda h: scores[layer][h])]
    assert pipeline.apply_plan(model, plan) is True
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)


def test_layer_plans_follow_block_influence_or_take_the_last_layers():
    model = _model()
    calib = _calib()
    bi = layer_scores(model, calib)["block_influence"]
    plan = pipeline.plan_layers(model, "block_influence", 2, calib)
    assert plan.removed == sorted(sorted(range(4), key=bi.__getitem__)[:2])
    assert pipeline.plan_layers(model, "last", 2).removed == [1, 2]
    assert pipeline.apply_plan(model, plan) is True and model.config.num_hidden_layers == 2


# ---------------------------------------------------------------------------------------- the CLI

def _cli(tmp_path, tiny_hf_dir, data_root, cache_dir, *overrides):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, "-m", "prunelab", "model=hf", f"model.path={tiny_hf_dir}", "calib.nsamples=2",
         "calib.seqlen=32", "eval.perplexity.seqlen=32", "eval.perplexity.max_windows=2", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)


def test_a_structured_run_shrinks_trains_saves_and_plain_transformers_reloads_it(tmp_path, tiny_hf_dir, data_root,
                                                                                cache_dir):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunelab.data import sources
    from prunelab.data.tokens import eval_stream
    from prunelab.eval.perplexity import perplexity

    proc = _cli(tmp_path, tiny_hf_dir, data_root, cache_dir, "structure=neurons", "structure.score=wanda",
                "structure.fraction=0.25", "structure.save=true", "finetune=masked", "finetune.seqlen=32",
                "finetune.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    record = metrics["structure"]
    assert record["units_before"] == 2 * 64 and record["units_after"] == 2 * 48
    assert record["units_removed_fraction"] == 0.25 and record["standard_config"] is True
    # 16 neurons x (gate row + up row + down column) x hidden 32, in each of the 2 layers
    assert record["params_before"] - record["params_after"] == 2 * 16 * 3 * 32
    # every removed parameter was one multiply-accumulate per token (attention is untouched by neurons)
    assert record["macs_per_token_before"] - record["macs_per_token_after"] == 2 * 16 * 3 * 32
    assert record["macs_context"] == 32
    assert metrics["finetune"]["steps"] == 2
    folder = tmp_path / "run" / "model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, nothing else
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.intermediate_size == 48
    stream = eval_stream(sources.eval_source("wikitext2", data_root), tokenizer, 32)
    assert perplexity(model, stream, 32, 2)["ppl"] == metrics["perplexity"]["wikitext2"]["ppl"]
    text = tokenizer.decode(model.generate(**tokenizer("The", return_tensors="pt"), max_new_tokens=5, do_sample=False)[0])
    assert text.startswith("The") and len(text) > 3


def test_heads_and_neurons_ranked_together_from_the_command_line(tmp_path, tiny_hf_dir, data_root, cache_dir):
    import json

    proc = _cli(tmp_path, tiny_hf_dir, data_root, cache_dir, "structure=heads_neurons", "structure.fraction=0.3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["structure"]
    assert record["unit"] == "heads_neurons" and record["score"] == "flap"  # the config's defaults: AL-AM
    heads = sum(map(len, record["removed"]["heads"]))
    neurons = sum(map(len, record["removed"]["neurons"]))
    assert record["units_before"] - record["units_after"] == heads + neurons
    # a query head owns 8 q rows and 8 o columns of width 32, a neuron gate + up rows and a down column;
    # FLAP adds a bias of 32 to every o_proj / down_proj that lost something
    biases = 32 * sum(1 for kind in ("heads", "neurons") for layer in record["removed"][kind] if layer)
    removed = heads * 2 * 8 * 32 + neurons * 3 * 32
    assert record["params_before"] - record["params_after"] == removed - biases
    total = 2 * (4 * 2 * 8 * 32 + 64 * 3 * 32)  # every head's and neuron's parameters in the 2 layers
    assert abs(removed - 0.3 * total) <= 2 * 8 * 32 * 2  # within one unit (a slice: a head of each KV group)


def test_prune_then_lora_recovery_is_one_command_on_a_shrunk_model(tmp_path, tiny_hf_dir, data_root, cache_dir):
    """LLM-Pruner's recipe: remove heads for real, then LoRA on the smaller projections, merged."""
    import json

    from transformers import AutoModelForCausalLM

    proc = _cli(tmp_path, tiny_hf_dir, data_root, cache_dir, "structure=heads", "structure.score=taylor",
                "structure.fraction=0.5", "structure.save=true", "finetune=lora", "finetune.seqlen=32",
                "finetune.max_steps=2", "finetune.lr=0.01")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert metrics["structure"]["units_after"] == 2 * 2 and metrics["finetune"]["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2  # one head per group
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (2 * 8, 32)
    # merged: a plain Linear again, and the adapters changed the shrunk weights
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, _surgery_reference(tiny_hf_dir, tmp_path))


def _surgery_reference(tiny_hf_dir, tmp_path):
    """Layer 0's q_proj after the same head removal without any training (the removed heads from the record)."""
    import json

    from transformers import AutoModelForCausalLM

    record = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["structure"]
    dense = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    kept = [h for h in range(4) if h not in record["removed"][0]]
    assert len(kept) == 2
    weight = dense.model.layers[0].self_attn.q_proj.weight.detach()
    return torch.cat([weight[8 * h: 8 * (h + 1)] for h in kept])


@pytest.mark.parametrize("overrides,needle", [
    (["structure=neurons", "method=wanda"], "leave method=dense"),
    (["structure=layers", "structure.count=2"], "the model has 2 layers"),
    (["structure=heads", "structure.score=block_influence"], "structure.score"),
    (["structure=neurons", "structure.fraction=1.0"], "structure.fraction=1.0"),
])
def test_bad_structure_settings_stop_before_the_model_loads(overrides, needle, tmp_path, tiny_hf_dir, data_root,
                                                            cache_dir):
    import json

    proc = _cli(tmp_path, tiny_hf_dir, data_root, cache_dir, *overrides)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and needle in said and "Traceback" not in said
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["phase"] == "preflight"


def test_per_layer_widths_and_flap_biases_reload_through_prunelabs_loader(tmp_path):
    from transformers import AutoTokenizer

    from prunelab.models.loading import load_model

    model = _model()
    calib = _calib()
    stats = pipeline.channel_stats(model, calib, "neurons")
    scores = pipeline.unit_scores(model, "neurons", "flap", stats=stats)
    plan = pipeline.plan_units(model, "neurons", "flap", 0.3, scores, allocation="global", stats=stats)
    assert len({len(r) for r in plan.removed}) > 1, "global ranking should give the layers different widths"
    assert pipeline.apply_plan(model, plan) is False
    stats = pipeline.channel_stats(model, calib, "heads")
    heads = pipeline.plan_units(model, "heads", "wanda", 0.5, pipeline.unit_scores(model, "heads", "wanda", stats=stats),
                                protect=[0, 3], heads="groups")
    pipeline.apply_plan(model, heads)  # layers 1 and 2 lose a KV group, 0 and 3 keep both
    with torch.no_grad():
        expected = model(input_ids=calib).logits
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(tmp_path / "model")
    loaded, _ = load_model({"name": "shrunk", "source": "hf", "path": str(tmp_path / "model"), "dtype": "float32"}, "cpu")
    assert [w["mlp"] for w in surgery.layer_widths(loaded)] == [w["mlp"] for w in surgery.layer_widths(model)]
    assert [w["kv_heads"] for w in surgery.layer_widths(loaded)] == [2, 1, 1, 2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=calib).logits, expected)


def _tokenizer_dir():
    """A one-word tokenizer: the loader needs a tokenizer in the folder, the test none of its words."""
    import tempfile

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))).save_pretrained(folder)
    return folder


def test_attention_flops_count_each_layers_own_heads():
    from prunelab.eval.size import flops_per_token

    model = _model()
    surgery.remove_heads(model, 1, [0, 1])  # one whole KV group of layer 1
    assert surgery.sync_config(model) is False
    flops = flops_per_token(model, 10)
    # 2 x 2 x heads x head_dim x keys per layer: 4, 2, 4, 4 heads of 8 dims, 10 keys
    assert flops["attention"] == 2 * 2 * (4 + 2 + 4 + 4) * 8 * 10


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                                    num_attention_heads=4, word_embed_proj_dim=32)).eval()


def test_heads_of_a_model_without_gqa_are_ranked_per_layer_with_their_k_and_v_rows():
    model = _opt()
    attn = model.model.decoder.layers[1].self_attn
    scores = pipeline.unit_scores(model, "heads", "magnitude")
    for head in range(4):  # q, k, v rows and o columns of the head, by hand
        block = slice(head * 8, (head + 1) * 8)
        want = sum(m.weight[block].pow(2).sum() for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        want = (want + attn.out_proj.weight[:, block].pow(2).sum()).sqrt()
        assert scores[1][head].item() == pytest.approx(want.item(), rel=1e-5)
    plan = pipeline.plan_units(model, "heads", "magnitude", 0.34, scores)  # round(4 x 0.34) = 1 head a layer
    assert [len(r) for r in plan.removed] == [1, 1, 1]
    assert plan.removed[1] == [int(torch.argmin(scores[1]))]
    pipeline.apply_plan(model, plan)
    assert model.model.decoder.layers[1].self_attn.num_heads == 3


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def test_heads_of_gpt2s_fused_projection_own_their_q_k_and_v_slices():
    model = _gpt2()
    attn = model.transformer.h[1].attn
    fused = attn.c_attn.weight  # Conv1D: [in, out], outputs q | k | v, 4 heads of 8
    scores = pipeline.unit_scores(model, "heads", "magnitude")
    for head in range(4):
        want = sum(fused[:, part * 32 + head * 8: part * 32 + (head + 1) * 8].pow(2).sum() for part in range(3))
        want = (want + attn.c_proj.weight[head * 8:(head + 1) * 8, :].pow(2).sum()).sqrt()
        assert scores[1][head].item() == pytest.approx(want.item(), rel=1e-5)
    # Taylor: |w * dL/dw| over the same slices, with the gradient of the loss on the calibration windows
    calib = _calib()
    grads = pipeline.taylor_gradients(model, calib)
    model.zero_grad()
    loss = sum(model(input_ids=w[None], labels=w[None]).loss for w in calib)
    loss.backward()
    taylor = pipeline.unit_scores(model, "heads", "taylor", grads=grads)
    wg = (attn.c_attn.weight * attn.c_attn.weight.grad).abs()
    og = (attn.c_proj.weight * attn.c_proj.weight.grad).abs()
    for head in range(4):
        want = sum(wg[:, part * 32 + head * 8: part * 32 + (head + 1) * 8].sum() for part in range(3))
        want = want + og[head * 8:(head + 1) * 8, :].sum()
        assert taylor[1][head].item() == pytest.approx(want.item(), rel=1e-4)
    # Wanda-sp end to end: the lowest head of each layer goes, the model still runs
    stats = pipeline.channel_stats(model, calib, "heads")
    wanda = pipeline.unit_scores(model, "heads", "wanda", stats=stats)
    plan = pipeline.plan_units(model, "heads", "wanda", 0.25, wanda)
    assert plan.removed == [[int(torch.argmin(s))] for s in wanda]
    # GPT-2 derives head_dim = n_embd / n_head, so 3 heads of 8 are no standard config: prunelab's loader
    assert not pipeline.apply_plan(model, plan)
    assert [w["heads"] for w in model.config.prunelab_widths] == [3, 3]
    assert attn.c_attn.weight.shape == (32, 3 * 24) and attn.c_proj.weight.shape == (24, 32)
    logits = model(input_ids=calib).logits
    assert logits.shape == (4, 16, VOCAB)


def test_gpt2_with_heads_removed_reloads_through_prunelabs_loader(tmp_path):
    from prunelab.models.loading import load_shrunk

    model = _gpt2()
    calib = _calib()
    scores = pipeline.unit_scores(model, "heads", "magnitude")
    plan = pipeline.plan_units(model, "heads", "magnitude", 0.5, scores)
    pipeline.apply_plan(model, plan)
    model.save_pretrained(tmp_path)
    reloaded = load_shrunk(tmp_path).eval()
    assert reloaded.transformer.h[0].attn.c_attn.weight.shape == (32, 3 * 16)
    assert torch.equal(reloaded(input_ids=calib).logits, model(input_ids=calib).logits)


@pytest.mark.parametrize("make,kwargs,needle", [
    (_model, dict(unit="heads", fraction=0.9, allocation="global"), "every layer keeps one"),
    (_model, dict(unit="neurons", fraction=0.001, allocation="global"), "removes 0 of the 4 layers x 48 neurons"),
    (_model, dict(unit="heads", fraction=0.2), "removes 0 of the 2"),
    (_model, dict(unit="neurons", fraction=0.001), "rounds to none"),
    (_model, dict(unit="neurons", fraction=0.5, protect=[0, 1, 2, 3]), "every layer"),
    (_opt, dict(unit="heads", fraction=0.1), "rounds to none"),
])
def test_plans_that_cannot_work_are_refused_before_any_statistics(make, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        pipeline.check_plan(make(), **kwargs)


def test_a_plan_refused_after_the_load_is_one_line_before_any_statistics(tmp_path, tiny_hf_dir, data_root, cache_dir):
    import json

    proc = _cli(tmp_path, tiny_hf_dir, data_root, cache_dir, "structure=heads", "structure.allocation=global",
                "structure.fraction=0.9")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "every layer keeps one" in said and "Traceback" not in said
    # the plan check runs on the meta model in the preflight (before the load) or right after the load
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["phase"] in ("preflight", "structure_check")
