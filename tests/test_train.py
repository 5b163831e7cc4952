"""Training that keeps the masks: pruned weights and their Adam moments stay exactly zero, LoRA merges
as M ⊙ (W + B·A), the loss falls, and bad fine-tuning settings stop before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_gpt2, tiny_llama

from prunelab.train import loop
from prunelab.train.data import pack_windows
from prunelab.train.lora import merge, unknown_targets, wrap

REPO = Path(__file__).resolve().parents[1]

CFG = dict(seqlen=16, micro_batch=2, grad_accum=2, max_steps=6, max_tokens=None, lr=5e-2, weight_decay=0.1,
           warmup_steps=1, scheduler="cosine", max_grad_norm=1.0, bf16=True, gradient_checkpointing=False, seed=0,
           eval_every=None)


def _masks(model: torch.nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    """Keep-masks for every Linear weight in the decoder layers: random half, or 2 of every 4 inputs kept."""
    generator = torch.Generator().manual_seed(1)
    masks = {}
    for name, param in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight") or ".h." in name and name.endswith(("attn.weight", "fc.weight", "proj.weight")):
            if pattern == "2:4":
                scores = torch.rand(param.shape, generator=generator).reshape(-1, 4)
                keep = torch.zeros_like(scores, dtype=torch.bool)
                keep.scatter_(1, scores.topk(2, dim=1).indices, True)
                masks[name] = keep.reshape(param.shape)
            else:
                masks[name] = torch.rand(param.shape, generator=generator) > 0.5
    assert masks
    return masks


def _prune(model: torch.nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    """Zero what ``_masks`` prunes, as a pruning step leaves it, and return the masks."""
    masks = _masks(model, pattern)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
    return masks


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_weights_and_their_adam_moments_stay_zero(monkeypatch, build, pattern):
    model = build()
    masks = _prune(model, pattern)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizers = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda params, cfg: optimizers.append(real(params, cfg)) or optimizers[-1])
    result = loop.train(model, random_ids(16, 16), CFG, masks=masks)
    assert result["steps"] == 6 and result["tokens"] == 6 * 2 * 2 * 16
    params = dict(model.named_parameters())
    state = optimizers[0].state
    for name, mask in masks.items():
        param = params[name]
        assert torch.equal(param.detach()[~mask], torch.zeros(int((~mask).sum()))), f"{name}: a pruned weight revived"
        assert not torch.equal(param.detach()[mask], before[name][mask]), f"{name}: the kept weights did train"
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(state[param][moment][~mask]) == 0, f"{name}: {moment} of a pruned weight"
    # the exact count of zeros is the count before training, for every masked matrix
    for name, mask in masks.items():
        assert int((params[name] == 0).sum()) == int((before[name] == 0).sum())


def test_without_the_guard_the_same_training_revives_weights():
    """The check above can fail: plain AdamW (no masks) moves pruned weights off zero."""
    model = tiny_llama()
    masks = _prune(model, "unstructured")
    loop.train(model, random_ids(16, 16), CFG, masks=None)
    params = dict(model.named_parameters())
    assert any(torch.count_nonzero(params[n].detach()[~m]) > 0 for n, m in masks.items())


def test_fine_tuning_lowers_the_loss_on_a_repetitive_text():
    model = tiny_llama()
    windows = torch.arange(16).repeat(8, 2)[:, :32] % 11  # the same short sequence again and again
    cfg = dict(CFG, seqlen=32, max_steps=30, lr=1e-2, weight_decay=0.0, warmup_steps=2)
    result = loop.train(model, windows, cfg)
    first, last = result["history"][0]["loss"], result["history"][-1]["loss"]
    assert last < 0.3 * first, (first, last)
    assert [h["step"] for h in result["history"]] == list(range(1, 31))


def test_lora_merge_is_the_mask_times_w_plus_ba():
    model = tiny_llama()
    masks = _prune(model, "unstructured")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = wrap(model, {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "down_proj"]})
    torch.manual_seed(3)
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            with torch.no_grad():
                module.lora_B["default"].weight.normal_()
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            key = name.split("base_model.model.", 1)[1] + ".weight"
            deltas[key] = (b @ a).detach() * (8 / 4)
    assert len(deltas) == 2 * 3
    merged = merge(peft_model, masks)
    params = dict(merged.named_parameters())
    for name, delta in deltas.items():
        expected = masks[name] * (base[name] + delta)  # independent: M ⊙ (W + scale · B A)
        torch.testing.assert_close(params[name].detach(), expected)
        assert torch.count_nonzero(params[name].detach()[~masks[name]]) == 0
    untouched = [n for n in masks if n not in deltas]
    assert all(torch.equal(params[n].detach(), base[n]) for n in untouched)


def test_lora_targets_are_matched_like_peft_does():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert unknown_targets(["q_proj", "mlp.down_proj", "lm_head"], names) == []
    assert unknown_targets(["qproj", "proj"], names) == ["qproj", "proj"]


def test_windows_are_documents_joined_with_eos_and_cut():
    class Tok:
        eos_token_id = 0

        def __call__(self, text):
            return type("E", (), {"input_ids": [int(t) for t in text.split()]})()

    windows = pack_windows(["1 2 3", "4 5", "6 7 8 9"], Tok(), seqlen=4, count=2, seed=0)
    stream = windows.flatten().tolist()
    assert windows.shape == (2, 4) and stream.count(0) >= 1 and set(stream) <= set(range(10))
    repeated = pack_windows(["1 2 3"], Tok(), seqlen=2, count=5, seed=0)
    assert repeated.shape == (5, 2) and torch.equal(repeated[0], repeated[2])


def _cli(*args: str, cache_dir: Path, data_root: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "prunelab", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["finetune=masked", "finetune.max_tokens=0"], "finetune.max_tokens=0 gives no training"),
        (["finetune=lora", "finetune.lora.targets=[q_proj,qkv_proj]"], "qkv_proj name no Linear module of this model"),
        (["finetune=masked", "finetune.corpus=files"], "finetune.corpus=files needs finetune.files"),
        (["finetune=masked", "finetune.scheduler=wavy"], "finetune.scheduler='wavy' is not valid"),
        (["finetune=sideways"], "finetune=sideways: no such option; choose one of lora, masked, none"),
    ],
)
def test_bad_fine_tuning_settings_stop_before_the_model_loads(tmp_path, cache_dir, data_root, tiny_hf_dir, args, needle):
    run_dir = tmp_path / "bad"
    proc = _cli("model=hf", f"model.path={tiny_hf_dir}", "logger=none", *args, f"hydra.run.dir={run_dir}",
                cache_dir=cache_dir, data_root=data_root, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and needle in output, output[-1500:]
    assert "── load" not in output and not (run_dir / "results.json").exists()


@pytest.mark.parametrize("finetune,pattern", [("masked", "2:4"), ("lora", "unstructured")])
def test_prune_then_fine_tune_keeps_the_sparsity_to_the_weight(tmp_path, cache_dir, data_root, tiny_hf_dir, finetune, pattern):
    from prunelab.tracking.wandb_offline import read_offline_run

    run_dir = tmp_path / "run"
    proc = _cli("model=hf", f"model.path={tiny_hf_dir}", "method=wanda", "sparsity=0.5", f"pattern={pattern}",
                "calib.nsamples=2", "calib.seqlen=64", f"finetune={finetune}", "finetune.seqlen=64",
                "finetune.max_steps=4", "finetune.eval_every=2", "finetune.eval_windows=1", "finetune.lr=1e-3",
                "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=1", f"hydra.run.dir={run_dir}",
                cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    ft = metrics["finetune"]
    assert ft["steps"] == 4 and len(ft["history"]) == 4 and ft["tokens"] == 4 * 2 * 64
    assert [e["step"] for e in ft["evals"]] == [2, 4] and all(e["ppl_wikitext2"] > 1 for e in ft["evals"])
    assert ft["pruned_weights_revived"] == 0
    prunable = metrics["size"]["params"]["prunable"]  # measured on the trained model
    assert prunable["total"] - prunable["nonzero"] == ft["pruned_weights"]
    assert prunable["sparsity"] == pytest.approx(metrics["sparsity"]["overall"])
    wandb_run = read_offline_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    streamed = [row for row in wandb_run["history"] if "train/loss" in row]
    assert [row["_step"] for row in streamed] == [1, 2, 3, 4], "one W&B history row per optimizer step"
    assert [row["train/loss"] for row in streamed] == pytest.approx([h["loss"] for h in ft["history"]])
    assert streamed[1]["train/eval/ppl_wikitext2"] == pytest.approx(ft["evals"][0]["ppl_wikitext2"])
