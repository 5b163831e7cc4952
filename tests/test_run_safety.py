"""Runs and sweeps that cannot silently go wrong: every stop recorded, user errors early and in one line,
sweeps that survive a bad job, progress a person can see, and the README's commands composing."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli_env(cache_dir: Path, data_root: Path | str, **extra: str) -> dict[str, str]:
    return dict(os.environ, PRUNELAB_DATA=str(data_root), PRUNELAB_CACHE=str(cache_dir), WANDB_SILENT="true", **extra)


def run_cli(*args: str, cache_dir: Path, data_root: Path | str, cwd: Path = REPO, timeout: int = 300,
            **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab", *args], cwd=cwd, env=cli_env(cache_dir, data_root, **extra_env),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(tiny_hf_dir: Path, *more: str) -> list[str]:
    return ["model=hf", f"model.path={tiny_hf_dir}", "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=2",
            "calib.nsamples=2", "calib.seqlen=64", *more]


# ----------------------------------------------------------------------------------------- sweeps (item 5)

def test_a_sweep_runs_every_job_and_ends_non_zero_naming_the_failed_one(tmp_path, cache_dir, data_root, tiny_hf_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *tiny_args(tiny_hf_dir, "method=magnitude", "sparsity=0.3,1.5,0.5", "logger=none"),
                   f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 1, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2"], "every job of the sweep ran"
    for job in (jobs[0], jobs[2]):
        assert json.loads((job / "results.json").read_text())["status"] == "complete"
    assert not (jobs[1] / "results.json").exists()
    failed = json.loads((jobs[1] / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["phase"] == "preflight" and "sparsity=1.5" in failed["error"]
    output = proc.stdout + proc.stderr
    assert re.search(r"3 jobs, 2 complete, 1 not", output)
    assert re.search(r"1_magnitude_1\.5\S*: failed during preflight: ConfigError: sparsity=1\.5 .*\[.*sparsity=1\.5.*\]", output)
    assert "Traceback" not in output


def test_a_job_whose_pattern_does_not_fit_the_model_fails_alone(tmp_path, cache_dir, data_root, tiny_hf_dir):
    """A check that needs the loaded model (N:M against the widths) fails its job, not the sweep."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *tiny_args(tiny_hf_dir, "method=magnitude", "pattern=2:4,3:7", "sparsity=0.5,0.42857142857142855",
                                    "logger=none"),
                   f"hydra.sweep.dir={sweep}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 1
    outcomes = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        outcomes[job.name] = "complete" if (job / "results.json").exists() else json.loads((job / "failed.json").read_text())["phase"]
    assert len(outcomes) == 4, outcomes  # 2:4 at 0.43 and 3:7 at 0.5 contradict sparsity: preflight
    assert sorted(outcomes.values()) == ["check_pattern", "complete", "preflight", "preflight"], outcomes


# -------------------------------------------------------------------------------------- signals (item 6)

def _wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and needle in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {needle!r}: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never appeared in {path}")


@pytest.mark.parametrize("logger,signum", [("none", signal.SIGTERM), ("wandb_offline", signal.SIGTERM), ("none", signal.SIGINT)])
def test_a_signal_during_evaluation_leaves_failed_json_with_the_phase(tmp_path, cache_dir, data_root, tiny_hf_dir, logger,
                                                                      signum):
    """SIGTERM (schedulers) and SIGINT (Ctrl-C) alike: failed.json names phase and signal, one line, exit 128 + N."""
    run_dir = tmp_path / "run"
    args = ["model=hf", f"model.path={tiny_hf_dir}", "eval.perplexity.seqlen=32", "eval.perplexity.max_windows=null",
            f"logger={logger}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "prunelab", *args], cwd=REPO,
                            env=cli_env(cache_dir, data_root, PRUNELAB_PROGRESS_INTERVAL="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(run_dir / "cli.log", "perplexity wikitext2:", proc)  # the first window is scored
        proc.send_signal(signum)
        proc.wait(timeout=60)
        output = proc.stdout.read()
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, f"exits as a process stopped by {name} would"
    assert not (run_dir / "results.json").exists()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "interrupted" and failed["phase"] == "perplexity" and failed["signal"] == name
    assert "Traceback" not in output and f"stopped by {name}" in output


def test_sigterm_during_a_conversion_records_the_load_phase_and_leaves_no_staging(tmp_path, data_root):
    """The CLI with a converter that takes its time (a stand-in for the minute a real GGUF takes)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(4096))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    script = f"""
import sys, time
from prunelab.models import loading

def slow_conversion(gguf_path, folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"0" * 100_000)
    print("CONVERTING", flush=True)
    time.sleep(120)

loading.convert_gguf_to_safetensors = slow_conversion
sys.argv = ["prunelab", "model.path={gguf}", "model.sha256=null", "model.name=fake", "logger=none",
            "hydra.run.dir={run_dir}"]
from prunelab.cli import main
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=cli_env(cache, data_root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((cache / "models").glob("*.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list((cache / "models").glob("*.tmp-*")), "the conversion never started staging"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "interrupted" and failed["phase"] == "load" and failed["signal"] == "SIGTERM"
    assert list((cache / "models").iterdir()) == [], "the staging folder is removed on the way out"


def test_sigterm_inside_the_guard_raises_run_interrupted():
    from prunelab.interrupt import RunInterrupted, signal_interrupts

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        with signal_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_failure_names_the_phase_it_happened_in(tmp_path, monkeypatch, data_root, tiny_hf_dir):
    """The runner records the phase of any failure (here the size measurement, after perplexity)."""
    from hydra import compose, initialize_config_dir

    from prunelab.cli import CONFIG_DIR
    from prunelab.eval import size
    from prunelab.runner import run

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(size, "measure_size", broken)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=tiny_args(tiny_hf_dir, "logger=none", f"data_root={data_root}",
                                                    f"cache_dir={tmp_path / 'cache'}"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(cfg, tmp_path / "run")
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["phase"] == "size"
    assert failed["timings"]["perplexity_s"] > 0 and not (tmp_path / "run" / "results.json").exists()


# --------------------------------------------------------------------- user errors before the load (9, 10, 12)

@pytest.mark.parametrize(
    "args,needle",
    [
        (["+sparsty=0.5"], "sparsty is not a prunelab setting"),
        (["+eval.perplexity.windowz=3"], "eval.perplexity.windowz is not a prunelab setting"),
        (["cache_dir=/etc/hostname/cache"], "cache_dir=/etc/hostname/cache is not writable"),
        (["method=wanda", "allocation=explicit", "allocation.layers={0-1:0.3,1:0.6}"], "both set layer 1"),
        (["method=wanda", "allocation=explicit", "allocation.layers={a-b:0.3}"], "is not understood"),
        (["method=wanda", "allocation=explicit", "allocation.layers={1-9:0.3}"], "the model has 2 layers"),
        (["method=wanda", "allocation=explicit", "allocation.layers={1:1.5}"], "must be a fraction"),
        (["method=wanda", "prune.device=cuda"], "prune.device=cuda but this machine has no CUDA device"),
        (["method=wanda", "prune.device=gpu"], "prune.device='gpu' is not valid"),
        (["method=wanda", "prune.batch_size=0"], "prune.batch_size=0 must be a positive integer"),
        (["method=sparsegpt", "method.params.percdamp=-1"], "method.params.percdamp=-1 must be a number >= 0"),
        (["method=wanda", "+method.params.bogus=1"], "does not take parameter(s) bogus"),
        (["method=wanda", "calib.nsamples=10000000"], "lower calib.nsamples"),
    ],
)
def test_user_errors_stop_before_the_model_loads_in_one_line(tmp_path, cache_dir, data_root, tiny_hf_dir, args, needle):
    if any("cuda" in a for a in args):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "bad"
    proc = run_cli(*tiny_args(tiny_hf_dir, "logger=none", *args), f"hydra.run.dir={run_dir}",
                   cache_dir=cache_dir, data_root=data_root, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert needle in output
    assert "Traceback" not in output
    assert "── load" not in output, "the check must come before the model loads"
    assert not (run_dir / "results.json").exists()
    assert json.loads((run_dir / "failed.json").read_text())["phase"] == "preflight"


def test_unusual_settings_are_warned_and_recorded(tmp_path, cache_dir, data_root, tiny_hf_dir):
    run_dir = tmp_path / "long"
    # the tiny model knows 256 positions; Llama's RoPE runs past them without complaint
    proc = run_cli("model=hf", f"model.path={tiny_hf_dir}", "eval.perplexity.seqlen=300", "eval.perplexity.max_windows=1",
                   "logger=none", f"hydra.run.dir={run_dir}", cache_dir=cache_dir, data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert any("eval.perplexity.seqlen=300 is longer than the model's max_position_embeddings=256" in w
               for w in results["warnings"])
    assert "max_position_embeddings=256" in proc.stdout + proc.stderr


# ------------------------------------------------------------------ newcomer's edges (13, 14, 15, 16, 17)

def test_a_run_records_progress_in_its_log_and_an_honest_summary(tmp_path, cache_dir, data_root, tiny_hf_dir):
    """Progress goes through logging where stderr is no terminal (pipes, SLURM logs); results.json has the
    permissions of any new file; the perplexity says whether it covered the full split; the log tells
    the pruned Linears' sparsity from the whole model's."""
    from prunelab.tracking.wandb_offline import read_offline_run

    run_dir = tmp_path / "run"
    old_umask = os.umask(0o022)
    try:
        proc = run_cli(*tiny_args(tiny_hf_dir, "method=wanda", "sparsity=0.5"), f"hydra.run.dir={run_dir}",
                       cache_dir=cache_dir, data_root=data_root, PRUNELAB_PROGRESS_INTERVAL="0")
    finally:
        os.umask(old_umask)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log_text = (run_dir / "cli.log").read_text()
    assert re.search(r"prune wanda: 100%.*2/2", log_text), "layer k / L reaches the log file"
    assert re.search(r"perplexity wikitext2: 100%.*2/2", log_text)
    assert re.search(r"with wanda \(unstructured\): 50\.\d+% of their weights are zero", log_text)
    assert "whole model (embeddings and lm_head included)" in log_text
    results_file = run_dir / "results.json"
    assert stat.S_IMODE(results_file.stat().st_mode) == 0o644
    ppl = json.loads(results_file.read_text())["metrics"]["perplexity"]["wikitext2"]
    assert ppl["full_split"] is False and "complete" not in ppl
    summary = read_offline_run(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))["summary"]
    assert summary["metrics/perplexity/wikitext2/full_split"] is False
    assert not any(key.endswith("/complete") for key in summary)


def test_progress_logs_lines_when_stderr_is_not_a_terminal(caplog, monkeypatch):
    from prunelab.progress import progress

    monkeypatch.setenv("PRUNELAB_PROGRESS_INTERVAL", "0")
    with caplog.at_level("INFO", logger="prunelab.progress"):
        assert list(progress(range(5), desc="layers", unit="layer")) == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records if r.name == "prunelab.progress"]
    assert lines and "layers: 100%" in lines[-1] and "5/5" in lines[-1]


def test_a_relative_data_root_is_resolved_against_the_starting_folder(tmp_path, cache_dir, data_root, tiny_hf_dir):
    start = tmp_path / "elsewhere"
    start.mkdir()
    relative = os.path.relpath(data_root, start)
    run_dir = tmp_path / "run"
    proc = run_cli("model=hf", f"model.path={tiny_hf_dir}", "eval.perplexity.seqlen=64", "eval.perplexity.max_windows=1",
                   "logger=none", f"hydra.run.dir={run_dir}", cache_dir=cache_dir, data_root=relative, cwd=start)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((run_dir / "results.json").read_text())["config"]
    assert config["data_root"] == str(Path(data_root).resolve())
    # a relative root that does not exist from here is shown as the absolute folder that was looked in
    bad = run_cli("model=hf", f"model.path={tiny_hf_dir}", "logger=none", f"hydra.run.dir={tmp_path / 'bad'}",
                  cache_dir=cache_dir, data_root="../no-such-data", cwd=start, HF_HUB_OFFLINE="1")
    assert bad.returncode == 2
    assert str(tmp_path / "no-such-data" / "wikitext") in bad.stdout + bad.stderr


def test_progress_in_a_terminal_is_a_bar_and_in_a_widthless_one_log_lines(tmp_path):
    """A pseudo-terminal with a width gets tqdm's bar; one that reports no width (``script``, some
    ``docker exec -t``), where tqdm would draw nothing, gets the log lines."""
    import fcntl
    import pty
    import struct
    import termios

    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='LOG %(message)s')\n"
        "from prunelab.progress import progress\n"
        "for _ in progress(range(3), desc='layers', unit='layer'):\n"
        "    pass\n"
    )
    outputs = {}
    for columns in (120, 0):
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=follower, stdout=follower, stderr=follower,
                                env=dict(os.environ, PRUNELAB_PROGRESS_INTERVAL="0", COLUMNS="", LINES=""))
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
        os.close(leader)
        outputs[columns] = b"".join(chunks).decode(errors="replace")
    assert "layers: 100%" in outputs[120] and "3/3" in outputs[120] and "LOG layers" not in outputs[120]
    assert re.search(r"LOG layers: 100%.*3/3", outputs[0]), outputs[0]


def test_a_sequence_longer_than_a_learned_position_table_is_refused(tmp_path, default_tokenizer, data_root):
    """GPT-2 has no position past n_positions: refuse before loading (rotary models only warn)."""
    from hydra import compose, initialize_config_dir
    from transformers import GPT2Config, GPT2LMHeadModel

    from prunelab.cli import CONFIG_DIR
    from prunelab.config.schema import ConfigError
    from prunelab.runner import preflight

    folder = tmp_path / "tiny-gpt2"
    config = GPT2Config(vocab_size=len(default_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=hf", f"model.path={folder}", "eval.perplexity.seqlen=256",
                                           f"data_root={data_root}", f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match="eval.perplexity.seqlen=256 is longer than .*=128 .*learned table"):
        preflight(cfg)


def test_a_hub_id_without_a_hub_is_not_looked_up_before_the_load(monkeypatch):
    from prunelab.models.facts import read_model_facts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert read_model_facts({"name": "llama-2-7b", "source": "hf", "path": "meta-llama/Llama-2-7b-hf"}) is None
    assert time.monotonic() - start < 5


def test_help_says_what_prunelab_is(tmp_path, cache_dir, data_root):
    proc = run_cli("--help", cache_dir=cache_dir, data_root=data_root, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("prunelab: prune a large language model")
    assert "powered by Hydra" not in proc.stdout
    for needle in ("python -m prunelab method=wanda sparsity=0.6", "method: dense, magnitude", "results.json"):
        assert needle in proc.stdout


# ------------------------------------------------------------------------------------ README (item 11)

def readme_commands() -> list[list[str]]:
    """Every prunelab command in the README's bash blocks, split as the shell would: ``python -m prunelab``,
    the ``prunelab`` console script and ``make run ARGS="..."``."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python -m prunelab ") or line == "python -m prunelab":
                commands.append(shlex.split(line)[3:])
            elif line.startswith("prunelab "):
                commands.append(shlex.split(line)[1:])
            elif line.startswith("make run ARGS="):
                commands.append(shlex.split(shlex.split(line)[2].removeprefix("ARGS="))[0:])
    return commands


def test_the_readme_shows_an_explicit_allocation_that_parses():
    assert any("allocation=explicit" in args for args in readme_commands())


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_composes_and_validates(args, tiny_hf_dir):
    """Compose each README command (every job of a sweep) as Hydra would, and run the value checks.

    A placeholder model folder (``model.path=<folder>``) stands for a real one: the tiny HF model's."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from prunelab.cli import CONFIG_DIR
    from prunelab.config.schema import validate

    overrides = [a for a in args if a != "-m" and not a.startswith(("hydra.", "hydra/", "--"))]
    overrides = [f"model.path={tiny_hf_dir}" if a.startswith("model.path=<") else a for a in overrides]
    overrides = [a for a in overrides if "<" not in a]  # placeholders such as <partition>
    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            validate(compose("config", overrides=list(job)))
