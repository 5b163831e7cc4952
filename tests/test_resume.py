"""Resume: a run stopped after any checkpoint and started again in the same folder ends with exactly
the weights and numbers of the run that was never stopped; the checkpoint is verified before it is
trusted, a kill at any moment leaves a whole checkpoint, and an interrupted run never looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunelab.io import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- the store alone

def test_generations_replace_each_other_and_a_kept_group_is_written_once(tmp_path):
    store = ckpt.CheckpointStore(tmp_path / "c", "f1")
    store.save({"position": 1}, {"weights": {"w": torch.ones(3)}, "rewind": {"w": torch.zeros(3)}})
    store.save({"position": 2}, {"weights": {"w": torch.full((3,), 2.0)}, "rewind": None})
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["rewind-1.safetensors", "state.json", "weights-2.safetensors"]
    loaded = ckpt.CheckpointStore(tmp_path / "c", "f1").load()
    assert loaded.state == {"position": 2} and loaded.generation == 2
    assert torch.equal(loaded.tensors["weights"]["w"], torch.full((3,), 2.0))
    assert torch.equal(loaded.tensors["rewind"]["w"], torch.zeros(3))


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    store = ckpt.CheckpointStore(tmp_path / "c", "f1")
    store.save({"position": 1}, {"weights": {"w": torch.ones(3)}})
    # what a kill between writing the new tensors and replacing state.json leaves behind
    (tmp_path / "c" / "weights-2.safetensors").write_bytes(b"half a file")
    (tmp_path / "c" / "state.json.partial").write_text("{")
    store = ckpt.CheckpointStore(tmp_path / "c", "f1")
    loaded = store.load()
    assert loaded.state == {"position": 1} and torch.equal(loaded.tensors["weights"]["w"], torch.ones(3))
    store.save({"position": 2}, {"weights": {"w": torch.zeros(3)}})  # the next save sweeps the leftovers
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["state.json", "weights-2.safetensors"]


def test_a_kill_while_removing_leaves_no_checkpoint_rather_than_a_broken_one(tmp_path, monkeypatch):
    store = ckpt.CheckpointStore(tmp_path / "c", "f1")
    store.save({"position": 1}, {"weights": {"w": torch.ones(3)}, "masks": {"w": torch.ones(3, dtype=torch.bool)}})
    original, calls = Path.unlink, []

    def unlink_then_die(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise Stop()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink_then_die)
    with pytest.raises(Stop):
        store.remove()
    monkeypatch.setattr(Path, "unlink", original)
    assert calls[0] == "state.json" and ckpt.CheckpointStore(tmp_path / "c", "f1").read_state() is None


def test_a_damaged_or_foreign_checkpoint_is_refused_with_the_remedy(tmp_path):
    store = ckpt.CheckpointStore(tmp_path / "c", "f1")
    store.save({"position": 1}, {"weights": {"w": torch.arange(1000.0)}})
    with pytest.raises(ckpt.CheckpointError, match="another configuration"):
        ckpt.CheckpointStore(tmp_path / "c", "f2").read_state()
    path = tmp_path / "c" / "weights-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a weight, the size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"weights-1.safetensors does not match its recorded sha256.*delete"):
        ckpt.CheckpointStore(tmp_path / "c", "f1").load()


def test_optimizer_state_survives_the_split_into_json_and_tensors():
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.8, 0.95))
    for _ in range(2):
        param.grad = torch.randn(4, 3)
        optimizer.step()
    plain, tensors = ckpt.optimizer_to_tensors(optimizer.state_dict())
    plain = json.loads(json.dumps(plain))  # what state.json gives back
    other = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=5.0)
    other.load_state_dict(ckpt.optimizer_from_tensors(plain, tensors))
    assert other.param_groups[0]["lr"] == 1e-2 and other.param_groups[0]["betas"] == (0.8, 0.95)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(other.state[other.param_groups[0]["params"][0]][key], optimizer.state[param][key])


# ------------------------------------------------------------------------ whole runs, stopped and resumed

def _cfg(tiny_hf_dir, data_root, cache, *overrides):
    from hydra import compose, initialize_config_dir

    from prunelab.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[
            "model=hf", f"model.path={tiny_hf_dir}", "logger=none", "finetune=masked", "finetune.seqlen=32",
            "finetune.max_steps=4", "finetune.lr=1e-2", "finetune.warmup_steps=1", "eval.perplexity.seqlen=32",
            "eval.perplexity.max_windows=2", "schedule.eval_windows=1", "calib.nsamples=2", "calib.seqlen=32",
            "checkpoint.keep=true", f"data_root={data_root}", f"cache_dir={cache}", *overrides])


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    return load_file(run_dir / "checkpoint" / state["files"]["weights"]["file"])


class Stop(KeyboardInterrupt):
    """What the runner sees when a person presses Ctrl-C (or SIGTERM arrives) right after a save."""


RUNS = {
    "oneshot": ["method=sparsegpt", "sparsity=0.5"],
    "iterative": ["method=wanda", "sparsity=0.6", "schedule=iterative", "schedule.steps=2"],
    "iterative-inside": ["method=sparsegpt", "sparsity=0.6", "schedule=iterative", "schedule.steps=2",
                         "checkpoint.every=2"],
    "iterative-random": ["method=random", "sparsity=0.6", "schedule=iterative", "schedule.steps=3"],
    "iterative-untrained": ["method=magnitude", "sparsity=0.6", "schedule=iterative", "schedule.steps=3",
                            "finetune=none"],
    "lottery": ["method=magnitude", "schedule=lottery", "schedule.rounds=2", "schedule.rate=0.3",
                "schedule.rewind_step=1", "schedule.controls=[random,oneshot]", "checkpoint.every=3"],
    "lottery-random": ["method=random", "schedule=lottery", "schedule.rounds=2", "schedule.rate=0.3",
                       "schedule.controls=[oneshot]", "checkpoint.every=3"],
    "oneshot-lora": ["method=magnitude", "sparsity=0.5", "finetune=lora", "finetune.max_steps=4",
                     "checkpoint.every=2"],
}
# (run, the save after which it is stopped). iterative: 1 between a pruning and its training, 2 after a
# step, 4 the last save; iterative-inside 5: inside step 2's training (optimizer state); lottery (every=3,
# 4 steps a training): 1 inside round 1 with the W_1 snapshot, 4 after round 2, 5 inside the ticket's
# training, 8 after the random control, 9 inside the oneshot control's training (its pruning replayed),
# 10 the last; lottery-random 7 inside the oneshot control with method=random's draws replayed
CASES = [("oneshot", 1), ("oneshot", 2), ("iterative", 1), ("iterative", 2), ("iterative", 4),
         ("iterative-inside", 5), ("iterative-random", 2), ("iterative-untrained", 2), ("lottery", 1),
         ("lottery", 4), ("lottery", 5), ("lottery", 8), ("lottery", 9), ("lottery", 10), ("lottery-random", 7),
         ("oneshot-lora", 2)]

VARYING = {"timings", "seconds", "tokens_per_s", "resumed_from", "run_dir", "peak_memory_mb", "saved"}


def _without_times(value):
    """The payload as results.json stores it, without what differs between two runs of the same work
    (clocks, folders, memory)."""
    return _strip(json.loads(json.dumps(value, default=str)))


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VARYING and not k.endswith("_s")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_hf_dir, data_root):
    """Each run of RUNS once, never stopped: its results and final weights, and how many saves it made."""
    from prunelab.runner import run

    base = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for name, overrides in RUNS.items():
        saves = []
        original = ckpt.CheckpointStore.save
        ckpt.CheckpointStore.save = lambda self, *a, **k: (saves.append(1), original(self, *a, **k))[1]
        try:
            payload = run(_cfg(tiny_hf_dir, data_root, base / "cache", *overrides), base / name)
        finally:
            ckpt.CheckpointStore.save = original
        out[name] = (payload, _final_weights(base / name), len(saves))
    return out


@pytest.mark.parametrize("name,stop_after", CASES)
def test_a_run_stopped_after_any_checkpoint_resumes_to_the_uninterrupted_result(
        name, stop_after, uninterrupted, tmp_path, monkeypatch, tiny_hf_dir, data_root):
    from prunelab.runner import run

    expected, expected_weights, total_saves = uninterrupted[name]
    assert stop_after <= total_saves, f"{name} saves {total_saves} checkpoints"
    cfg = _cfg(tiny_hf_dir, data_root, tmp_path / "cache", *RUNS[name])
    run_dir = tmp_path / "run"
    original, count = ckpt.CheckpointStore.save, [0]

    def save_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count[0] += 1
        if count[0] == stop_after:
            raise Stop()

    monkeypatch.setattr(ckpt.CheckpointStore, "save", save_then_stop)
    with pytest.raises(Stop):
        run(cfg, run_dir)
    assert not (run_dir / "results.json").exists()
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "interrupted"

    monkeypatch.setattr(ckpt.CheckpointStore, "save", original)
    resumed = run(cfg, run_dir)
    assert resumed["resumed_from"]["generation"] == stop_after
    assert not (run_dir / "failed.json").exists()
    got = _final_weights(run_dir)
    assert got.keys() == expected_weights.keys()
    assert all(torch.equal(got[k], expected_weights[k]) for k in got), "resumed weights differ from the uninterrupted run"
    # everything results.json says, but clocks and folders: perplexities, sparsities, every training's
    # per-step losses, the trajectory, the ticket, the controls' evaluations, the pruning reports
    assert _without_times(resumed["metrics"]) == _without_times(expected["metrics"])
    assert _without_times(resumed["calibration"] if "calibration" in resumed else None) == \
        _without_times(expected.get("calibration"))


def test_a_checkpoint_resumed_on_another_machine_kind_says_it_is_not_bit_for_bit(tmp_path, monkeypatch, tiny_hf_dir,
                                                                                  data_root):
    """Another thread count sums in another order: the resume goes on, with a recorded warning."""
    from prunelab.runner import run

    cfg = _cfg(tiny_hf_dir, data_root, tmp_path / "cache", *RUNS["oneshot"])
    original = ckpt.CheckpointStore.save

    def save_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise Stop()

    monkeypatch.setattr(ckpt.CheckpointStore, "save", save_then_stop)
    with pytest.raises(Stop):
        run(cfg, tmp_path / "run")
    monkeypatch.setattr(ckpt.CheckpointStore, "save", original)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        resumed = run(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    assert resumed["resumed_from"]["generation"] == 1
    assert any("another machine" in w and f"torch_threads {threads} -> {threads + 1}" in w for w in resumed["warnings"])


def test_a_completed_run_removes_its_checkpoint_unless_asked_to_keep_it(tmp_path, tiny_hf_dir, data_root):
    from prunelab.runner import run

    cfg = _cfg(tiny_hf_dir, data_root, tmp_path / "cache", "method=magnitude", "checkpoint.keep=false")
    run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "checkpoint").exists()


# -------------------------------------------------------------------------- through the CLI, really killed

def _cli(run_dir, tiny_hf_dir, data_root, cache_dir, *overrides):
    env = dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true")
    args = [sys.executable, "-m", "prunelab", "model=hf", f"model.path={tiny_hf_dir}", "method=magnitude",
            "sparsity=0.6", "schedule=iterative", "schedule.steps=3", "schedule.eval_windows=1", "finetune=masked",
            "finetune.seqlen=32", "finetune.max_steps=20", "checkpoint.every=1", "eval.perplexity.seqlen=32",
            "eval.perplexity.max_windows=1", "logger=wandb_offline", f"hydra.run.dir={run_dir}", *overrides]
    return args, env


def test_a_killed_cli_run_resumes_when_the_same_command_runs_again(tmp_path, tiny_hf_dir, data_root, cache_dir):
    args, env = _cli(tmp_path / "killed", tiny_hf_dir, data_root, cache_dir)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state.read_text())["generation"] >= 8:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists(), "the kill came after the run had finished"
    logged_before_kill = json.loads(state.read_text())["data"]["job"]["logger"]
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from the checkpoint" in again.stderr + again.stdout

    # W&B: the resumed run continues the same run id after the checkpoint's last step
    from prunelab.tracking.wandb_offline import read_offline_run

    folders = sorted((tmp_path / "killed" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith("-" + logged_before_kill["id"]) for f in folders)
    second = read_offline_run(next(folders[1].glob("run-*.wandb")))
    assert second["run_id"] == logged_before_kill["id"]
    steps = [row["_step"] for row in second["history"] if "train/loss" in row]
    assert steps[0] == logged_before_kill["step"] + 1 and steps == sorted(steps)

    args, env = _cli(tmp_path / "whole", tiny_hf_dir, data_root, cache_dir)
    whole = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    reference = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert resumed["resumed_from"]["generation"] >= 8 and "resumed_from" not in reference
    assert resumed["metrics"]["perplexity"] == reference["metrics"]["perplexity"]
    assert not (tmp_path / "killed" / "checkpoint").exists()

    # the same folder with other settings: refused in one line before the model loads (the finished
    # results.json is moved away so that the checkpoint's own check is the one that speaks)
    (tmp_path / "killed" / "results.json").rename(tmp_path / "results-of-the-resumed-run.json")
    args, env = _cli(tmp_path / "killed", tiny_hf_dir, data_root, cache_dir, "finetune.lr=1e-3")
    (tmp_path / "killed" / "checkpoint").mkdir()
    (tmp_path / "killed" / "checkpoint" / "state.json").write_text(state_of_another_run())
    other = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    said = other.stdout + other.stderr
    assert other.returncode == 2 and "another configuration" in said and "Traceback" not in said
    assert json.loads((tmp_path / "killed" / "failed.json").read_text())["phase"] == "setup"  # before the load


def state_of_another_run() -> str:
    return json.dumps({"format": ckpt.FORMAT, "version": ckpt.VERSION, "fingerprint": "0" * 64, "generation": 1,
                       "saved": "", "files": {}, "data": {}})
