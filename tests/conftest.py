"""Shared fixtures: the offline data root, the real default model (converted once) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cache_reuse import USER_CACHE, link_user_model_cache

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path | None:
    for candidate in (os.environ.get("PRUNELAB_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "wikitext").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.fail("no offline data root: set PRUNELAB_DATA to a folder laid out like shared/data")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, default_model_cfg) -> Path:
    """PRUNELAB_CACHE when set (CI sets it, so the model is converted once per run), else a temp dir
    that reuses, read-only, a verified conversion of the default model from the user's cache."""
    configured = os.environ.get("PRUNELAB_CACHE")
    if configured:
        return Path(configured)
    folder = tmp_path_factory.mktemp("prunelab-cache")
    link_user_model_cache(folder, USER_CACHE, default_model_cfg)
    return folder


@pytest.fixture(scope="session")
def default_model_cfg() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "prunelab" / "conf" / "model" / "smollm2-135m.yaml"))


@pytest.fixture(scope="session")
def default_model_dir(default_model_cfg, cache_dir) -> Path:
    """The default model as a safetensors folder (converted from its GGUF on first use)."""
    from prunelab.models.loading import prepare_packaged_model

    return prepare_packaged_model(default_model_cfg, cache_dir)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, default_tokenizer) -> Path:
    """A tiny random Llama with the default model's tokenizer, saved like any HF model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(default_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (for staging names whose writer is gone)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------------ test tiers
# Plain `python -m pytest -q` runs the unit tier: tensor math, configs, files, tiny models built in the
# test. A test is put in the integration tier (run with `-m integration`, or everything with
# `-m "integration or not integration"` as .ci/run does) when it needs the real default model (its
# tokenizer too: the tiny HF folder carries it), runs the CLI in a subprocess, or is marked slow.
REAL_MODEL_FIXTURES = {"default_model_dir", "default_tokenizer", "tiny_hf_dir", "cache_dir"}
SUBPROCESS_CALLS = ("subprocess.", "run_cli(", "_cli(", "Popen(")


def _fixture_closure(item: pytest.Item, names: set[str]) -> set[str]:
    """``names`` and every fixture they request, as pytest resolves them for ``item``."""
    manager, seen, todo = item.session._fixturemanager, set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for definition in manager.getfixturedefs(name, item) or ():
            todo.extend(definition.argnames)
    return seen


def _needs_integration(item: pytest.Item) -> bool:
    import inspect

    requested = set(getattr(item, "fixturenames", ()))
    # fixtures a parametrized test asks for by name (request.getfixturevalue(<param>))
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        requested |= _fixture_closure(item, {v for v in callspec.params.values() if isinstance(v, str)})
    if REAL_MODEL_FIXTURES & requested or item.get_closest_marker("slow"):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return False
    return any(call in source for call in SUBPROCESS_CALLS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_integration(item):
            item.add_marker(pytest.mark.integration)
