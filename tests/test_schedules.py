"""Schedules: sparsity sequences equal their closed forms, the drivers call the steps in the papers'
order with monotone masks, rewinding restores survivors bit for bit, and bad settings stop early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab.schedules import drivers, sequences

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- closed forms

def test_cubic_linear_and_constant_fraction_targets():
    # s_t = s_f + (s_0 - s_f)(1 - t/n)^3 with s_0 = 0.1, s_f = 0.7, n = 4, written out by hand
    assert sequences.targets("cubic", 0.1, 0.7, 4) == pytest.approx(
        [0.7 - 0.6 * 0.75**3, 0.7 - 0.6 * 0.5**3, 0.7 - 0.6 * 0.25**3, 0.7])
    assert sequences.targets("linear", 0.1, 0.7, 3) == pytest.approx([0.3, 0.5, 0.7])
    # the same share of the survivors each step: 1 - 0.4^(t/2)
    assert sequences.targets("constant_fraction", 0.0, 0.6, 2) == pytest.approx([1 - 0.4**0.5, 0.6])
    assert sequences.lottery(0.2, 3) == pytest.approx([0.2, 0.36, 0.488])


@pytest.mark.parametrize("rule", sequences.KNOWN_RULES)
def test_every_rule_rises_monotonically_to_the_final_sparsity(rule):
    values = sequences.targets(rule, 0.0, 0.8, 7)
    assert values[-1] == pytest.approx(0.8) and all(a < b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------------ drivers with a fake job

class FakeJob:
    """Records what a driver asks; a model of four 'weights' (names a..d) pruned by index."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.pruned: set[str] = set()
        self.order = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]

    def prune(self, sparsity, frozen):
        frozen_names = {n for n, keep in (frozen or {}).items() if not bool(keep)}
        assert frozen_names <= self.pruned, "frozen masks are the current ones"
        self.calls.append(("prune", round(sparsity, 6), frozenset(frozen_names)))
        self.pruned = set(self.order[: int(len(self.order) * sparsity + 1e-9)]) | frozen_names
        return {"summary": {}}

    def masks(self):
        return {n: torch.tensor(n not in self.pruned) for n in self.order}

    def finetune(self, masks, snapshot_step=None, stage="finetune"):
        self.calls.append(("finetune", snapshot_step))
        record = {"steps": 1}
        if snapshot_step is not None:
            record["weights_at_snapshot"] = {"at": snapshot_step}
        return record

    def weights(self):
        self.calls.append(("weights",))
        return {"at": 0}

    def rewind(self, weights, masks):
        self.calls.append(("rewind", weights["at"], frozenset(n for n, k in masks.items() if not bool(k))))

    def random_masks(self, like, seed):
        return like

    def checkpoint_eval(self):
        return {"ppl_x": 1.0}

    def record(self, point):
        pass

    def sparsity(self):
        return len(self.pruned) / len(self.order)

    def evaluate(self):
        return {}

    def resume(self):
        return None, None

    def save(self, state, masks):
        pass

    def keep(self, group, tensors):
        self.__dict__.setdefault("_kept", {})[group] = tensors

    def kept(self, group):
        return self.__dict__.get("_kept", {}).get(group)


def test_iterative_prunes_to_each_target_with_earlier_masks_frozen_then_trains():
    job = FakeJob()
    result = drivers.iterative(job, {"rule": "linear", "initial_sparsity": 0.0, "steps": 3}, 0.6, finetune=True)
    prunes = [c for c in job.calls if c[0] == "prune"]
    assert [c[1] for c in prunes] == pytest.approx([0.2, 0.4, 0.6])
    assert prunes[0][2] == frozenset() and prunes[1][2] == {"a", "b"} and prunes[2][2] == {"a", "b", "c", "d"}
    assert [c[0] for c in job.calls] == ["prune", "finetune"] * 3
    assert [p["achieved"] for p in result["trajectory"]] == pytest.approx([0.2, 0.4, 0.6])


@pytest.mark.parametrize("rewind_step", [0, 5])
def test_lottery_trains_prunes_a_share_of_the_survivors_and_rewinds_each_round(rewind_step):
    job = FakeJob()
    result = drivers.lottery(job, {"rate": 0.5, "rounds": 2, "rewind_step": rewind_step})
    expected = ([("weights",)] if rewind_step == 0 else []) + [
        ("finetune", None if rewind_step == 0 else rewind_step), ("prune", 0.5, frozenset()),
        ("rewind", rewind_step, frozenset("abcde")),
        ("finetune", None), ("prune", 0.75, frozenset("abcde")), ("rewind", rewind_step, frozenset("abcdefg")),
        ("finetune", None),  # the ticket
    ]
    assert job.calls == expected
    assert result["targets"] == pytest.approx([0.5, 0.75]) and result["ticket"]["achieved"] == pytest.approx(0.7)


# ------------------------------------------------------------------------- the run's job on a real model

def _job(tmp_path, tiny_hf_dir, data_root, *overrides):
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunelab.cli import CONFIG_DIR
    from prunelab.config.typed import run_config
    from prunelab.prune.methods import build_method
    from prunelab.prune.pattern import Pattern
    from prunelab.runner import Timer
    from prunelab.schedules.job import RunJob
    from prunelab.tracking.wandb_logger import WandbLogger

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=hf", f"model.path={tiny_hf_dir}", "method=magnitude", "logger=none",
                                           "finetune=masked", "finetune.seqlen=32", "finetune.max_steps=4",
                                           "finetune.lr=1e-2", "finetune.warmup_steps=0", "eval.perplexity.seqlen=32",
                                           f"data_root={data_root}", f"cache_dir={tmp_path / 'cache'}", *overrides])
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    conf = run_config(cfg)  # what the runner hands the job
    return RunJob(model, tokenizer, conf, build_method("magnitude"), Pattern.parse("unstructured"), {}, Timer(),
                  WandbLogger(conf.logger), tmp_path / "run")


def test_rewinding_restores_the_survivors_bit_for_bit_and_keeps_the_pruned_at_zero(tmp_path, tiny_hf_dir, data_root):
    job = _job(tmp_path, tiny_hf_dir, data_root)
    w0 = job.weights()
    job.finetune(job.masks())
    trained = job.weights()
    assert any(not torch.equal(trained[n], w0[n]) for n in w0), "training moved the weights"
    job.prune(0.4, None)
    masks = job.masks()
    job.rewind(w0, masks)
    params = dict(job.model.named_parameters())
    for name, value in w0.items():
        current = params[name].detach()
        if name in masks:
            assert torch.equal(current[masks[name]], value[masks[name]]), f"{name}: survivors are W_0 exactly"
            assert torch.count_nonzero(current[~masks[name]]) == 0
        else:
            assert torch.equal(current, value), f"{name}: untargeted weights (embeddings, norms) are W_0 too"


def test_the_rewind_point_after_k_steps_is_the_weights_after_k_steps(tmp_path, tiny_hf_dir, data_root):
    """W_k from a training's snapshot equals a separate k-step training from the same start (CPU, same seed)."""
    # a constant learning rate, so the first 2 of 4 steps see the rates of a 2-step training
    job = _job(tmp_path, tiny_hf_dir, data_root, "finetune.scheduler=constant")
    start = job.weights()
    snapshot = job.finetune(job.masks(), snapshot_step=2)["weights_at_snapshot"]
    short = _job(tmp_path, tiny_hf_dir, data_root, "finetune.scheduler=constant", "finetune.max_steps=2")
    short.rewind(start, {})
    short.finetune(short.masks())
    after_two = short.weights()
    for name in start:
        assert torch.equal(snapshot[name], after_two[name]), name


def test_random_control_masks_keep_each_matrixs_count(tmp_path, tiny_hf_dir, data_root):
    job = _job(tmp_path, tiny_hf_dir, data_root)
    job.prune(0.5, None)
    ticket = job.masks()
    control = job.random_masks(ticket, seed=3)
    for name, keep in ticket.items():
        assert int(control[name].sum()) == int(keep.sum()) and not torch.equal(control[name], keep)


# ------------------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method=wanda", "schedule=iterative", "schedule.steps=0"], "schedule.steps=0 must be a positive integer"),
        (["method=magnitude", "schedule=lottery", "schedule.rate=1.2", "finetune=masked"], "schedule.rate=1.2 must lie in (0, 1)"),
        (["method=magnitude", "schedule=lottery"], "schedule=lottery trains between rounds: set finetune=masked"),
        (["method=wanda", "schedule=iterative", "pattern=2:4"], "N:M fixes it: use pattern=unstructured"),
        (["schedule=iterative"], "schedule=iterative prunes: choose a method"),
        (["method=magnitude", "schedule=lottery", "finetune=masked", "schedule.controls=[shuffled]"], "schedule.controls='shuffled'"),
        (["method=magnitude", "schedule=lottery", "finetune=masked", "finetune.max_steps=5", "schedule.rewind_step=9"],
         "schedule.rewind_step=9 is past the 5 steps"),
        (["method=wanda", "schedule=iterative", "schedule.rule=exponential"], "schedule.rule='exponential' is not valid"),
    ],
)
def test_bad_schedule_settings_are_refused_before_loading(overrides, needle):
    from hydra import compose, initialize_config_dir

    from prunelab.cli import CONFIG_DIR
    from prunelab.config.schema import ConfigError, validate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert needle in str(info.value)


# ---------------------------------------------------------------------------------- end to end (CLI)

def test_iterative_run_records_its_trajectory_and_streams_it(tmp_path, cache_dir, data_root, tiny_hf_dir):
    from prunelab.tracking.wandb_offline import read_offline_run

    run_dir = tmp_path / "run"
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "-m", "prunelab", "model=hf", f"model.path={tiny_hf_dir}", "method=sparsegpt", "sparsity=0.6",
         "schedule=iterative", "schedule.steps=3", "schedule.eval_windows=1", "finetune=masked", "finetune.seqlen=32",
         "finetune.max_steps=2", "calib.nsamples=2", "calib.seqlen=32", "eval.perplexity.seqlen=32",
         "eval.perplexity.max_windows=1", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    schedule = metrics["schedule"]
    assert schedule["targets"] == pytest.approx(sequences.targets("cubic", 0.0, 0.6, 3))
    achieved = [p["achieved"] for p in schedule["trajectory"]]
    assert all(a <= b for a, b in zip(achieved, achieved[1:])) and achieved[-1] == pytest.approx(0.6, abs=0.01)
    assert len(schedule["finetune"]) == 3 and all(f["pruned_weights_revived"] == 0 for f in schedule["finetune"])
    assert metrics["size"]["params"]["prunable"]["sparsity"] == pytest.approx(achieved[-1])
    rows = read_offline_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))["history"]
    points = [r for r in rows if "schedule/achieved" in r]
    assert [r["schedule/step"] for r in points] == [1, 2, 3]
    assert len([r for r in rows if "train/loss" in r]) == 6


def test_a_sweep_of_schedules_gives_the_trajectory_plot(tmp_path, cache_dir, data_root, tiny_hf_dir):
    from prunelab.report import build_report

    sweep = tmp_path / "sweep"
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "-m", "prunelab", "-m", "model=hf", f"model.path={tiny_hf_dir}", "method=magnitude",
         "sparsity=0.6", "schedule=oneshot,iterative", "schedule.steps=2", "schedule.eval_windows=1",
         "finetune=masked", "finetune.seqlen=32", "finetune.max_steps=1", "eval.perplexity.seqlen=32",
         "eval.perplexity.max_windows=1", "logger=none", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = build_report(sweep)
    plots = [p.name for p in result["plots"]]
    assert any(name.startswith("schedule_wikitext2_") for name in plots), plots
    assert "schedule_wikitext2_" in result["markdown"].read_text()
