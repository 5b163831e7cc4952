"""Latency measurement on CPU with a tiny model: structure and honesty of the result, never timing values."""

from __future__ import annotations

import itertools
import logging
import math
import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunelab.config.schema import LatencyConfig
from prunelab.eval.latency import (
    _semi_structured_unavailable,
    follows_two_four,
    measure_decode,
    measure_latency,
    semi_structured_weights,
    summarize,
    time_calls,
)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _positive_finite(stats: dict) -> None:
    assert stats["runs"] >= 1 and len(stats["samples"]) == stats["runs"]
    for key in ("median", "min", "max"):
        assert math.isfinite(stats[key]) and stats[key] > 0, key
    assert stats["min"] <= stats["median"] <= stats["max"] and stats["iqr"] >= 0


def test_cpu_latency_has_separate_prefill_and_decode(model) -> None:
    cfg = LatencyConfig(batch_size=2, prefill_lengths=[8, 16], decode_tokens=4, warmup=1, repeats=3)
    result = measure_latency(model, cfg, "cpu")
    assert result["device"]["type"] == "cpu"
    assert result["dtype"] == "float32" and result["torch"] == torch.__version__
    assert result["repeats"] == 3 and result["batch_size"] == 2
    assert set(result["prefill"]) == {"8", "16"}
    for length in (8, 16):
        entry = result["prefill"][str(length)]
        assert entry["tokens"] == 2 * length
        _positive_finite(entry["seconds"])
        assert entry["tokens_per_s"]["median"] == pytest.approx(2 * length / entry["seconds"]["median"])
    decode = result["decode"]
    assert decode["new_tokens"] == 4 and decode["prompt_len"] == 8 and decode["greedy"]
    assert decode["mode"] == "eager, dynamic KV cache" and not decode["compiled"]
    _positive_finite(decode["generate_ms"]["4"])
    _positive_finite(decode["generate_ms"]["1"])
    # one decode step = (generate 4 tokens - generate 1 token) / 3, sample by sample against the 1-token median
    first = decode["generate_ms"]["1"]["median"]
    assert decode["ms_per_token"]["samples"] == pytest.approx([(t - first) / 3 for t in decode["generate_ms"]["4"]["samples"]])
    assert decode["ms_per_token"]["median"] == pytest.approx((decode["generate_ms"]["4"]["median"] - first) / 3)
    assert result["decode_compiled"] is None
    assert result["kernels"]["used"] == "dense" and not result["kernels"]["requested"]
    assert result["notes"] == []
    assert model.training is False


def test_sparse_kernels_on_cpu_fall_back_loudly(model, caplog: pytest.LogCaptureFixture) -> None:
    before = {name: p for name, p in model.named_parameters()}
    cfg = LatencyConfig(prefill_lengths=[8], decode_tokens=2, warmup=0, repeats=1, sparse_kernels=True)
    with caplog.at_level(logging.WARNING):
        result = measure_latency(model, cfg)
    kernels = result["kernels"]
    assert kernels["requested"] and kernels["used"] == "dense" and kernels["swapped"] == 0
    assert "CUDA" in kernels["reason"]
    assert any("fell back to dense kernels" in note for note in result["notes"])
    assert "DENSE kernels are used" in caplog.text
    assert {name: p for name, p in model.named_parameters()} == before  # weights untouched


def test_semi_structured_needs_half_precision() -> None:
    assert "float16 or bfloat16" in _semi_structured_unavailable(torch.device("cuda"), torch.float32)
    assert "CUDA" in _semi_structured_unavailable(torch.device("cpu"), torch.float16)


def test_semi_structured_context_restores_weights(model) -> None:
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with semi_structured_weights(model, True, torch.device("cpu")) as report:
        assert report["used"] == "dense"
    assert [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] == weights


def _naive_two_four(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    if cols % 4:
        return False
    for r, g in itertools.product(range(rows), range(cols // 4)):
        if sum(1 for c in range(4 * g, 4 * g + 4) if weight[r, c].item() != 0) > 2:
            return False
    return True


def test_two_four_check_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    planted = torch.randn(6, 16, generator=gen)
    keep = torch.rand(6, 4, 4, generator=gen).argsort(dim=-1) < 2  # 2 of every 4 kept
    planted = planted * keep.reshape(6, 16)
    broken = planted.clone()
    broken[3, 8:12] = 1.0  # one group with 4 non-zeros
    cases = [planted, broken, torch.randn(4, 8, generator=gen), torch.zeros(2, 8), torch.zeros(2, 6)]
    for weight in cases:
        assert follows_two_four(weight) == _naive_two_four(weight)
    assert follows_two_four(planted) and not follows_two_four(broken)


def test_summarize_matches_statistics() -> None:
    samples = [4.0, 1.0, 3.0, 2.0, 5.0, 9.0]
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    stats = summarize(samples)
    assert stats["median"] == pytest.approx(median) and stats["iqr"] == pytest.approx(q3 - q1)
    assert (stats["min"], stats["max"], stats["runs"]) == (1.0, 9.0, 6)
    assert summarize(samples, scale=1000.0)["median"] == pytest.approx(1000 * median)


def test_time_calls_warms_up_then_times_with_torch_benchmark() -> None:
    calls = []
    measurement = time_calls(lambda: calls.append(sum(range(1000))), warmup=3, repeats=5)
    assert isinstance(measurement, torch.utils.benchmark.Measurement)
    assert len(measurement.times) >= 1 and all(t > 0 for t in measurement.times)
    # the warm-up calls come first, then at least one call per timed sample
    assert len(calls) >= 3 + len(measurement.times) * measurement.number_per_run
    stats = summarize(measurement, scale=1000.0)
    assert stats["median"] == pytest.approx(1000 * statistics.median(measurement.times))


@pytest.mark.parametrize("field,value", [("decode_tokens", 1), ("repeats", 0), ("prefill_lengths", []),
                                         ("batch_size", 0)])
def test_bad_config_is_rejected(model, field: str, value) -> None:
    cfg = LatencyConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        measure_latency(model, cfg)


def test_wrong_device_is_rejected(model) -> None:
    with pytest.raises(ValueError, match="move it first"):
        measure_latency(model, LatencyConfig(), device="meta")


def test_static_cache_compiled_decode_path_runs_on_cpu(model) -> None:
    """The compile=true plumbing through generate (static cache + transformers' compiled forward), with
    dynamo's eager backend so no C++ toolchain is needed; on CUDA the same path uses inductor."""
    import transformers

    config = transformers.CompileConfig(backend="eager", mode=None, fullgraph=True)
    config._compile_all_devices = True  # transformers otherwise compiles only on accelerators
    gen = torch.Generator().manual_seed(0)
    try:
        result = measure_decode(model, prompt_len=8, new_tokens=3, batch_size=1, warmup=0, repeats=2,
                                device=torch.device("cpu"), vocab_size=64, generator=gen, compile=True,
                                compile_config=config)
    finally:
        del model._compiled_call
        torch._dynamo.reset()  # leave no compiled state to other tests
    assert result["compiled"] and result["mode"] == "compiled, static KV cache"
    assert result["warmup_runs"] == 2  # compilation gets untimed runs even when warmup=0
    _positive_finite(result["generate_ms"]["3"])


def test_compile_true_adds_a_compiled_decode_next_to_the_eager_one(model, monkeypatch) -> None:
    import transformers

    from prunelab.eval import latency

    def eager_backend(device):
        config = transformers.CompileConfig(backend="eager", mode=None, fullgraph=True)
        config._compile_all_devices = True
        return config

    monkeypatch.setattr(latency, "default_compile_config", eager_backend)
    cfg = LatencyConfig(prefill_lengths=[8], decode_tokens=3, warmup=0, repeats=2, compile=True)
    try:
        result = measure_latency(model, cfg)
    finally:
        torch._dynamo.reset()
    assert result["decode"]["mode"] == "eager, dynamic KV cache" and not result["decode"]["compiled"]
    assert result["decode_compiled"]["mode"] == "compiled, static KV cache" and result["decode_compiled"]["compiled"]
    assert not hasattr(model, "_compiled_call")  # later forwards stay eager
    assert result["notes"] == []


def test_a_compiler_failure_is_a_note_not_a_crash(model, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    from prunelab.eval import latency

    real = latency.measure_decode

    def failing(*args, compile: bool, **kwargs):
        if compile:
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no C++ compiler found"), None)
        return real(*args, compile=compile, **kwargs)

    monkeypatch.setattr(latency, "measure_decode", failing)
    cfg = LatencyConfig(prefill_lengths=[8], decode_tokens=2, warmup=0, repeats=1, compile=True)
    with caplog.at_level(logging.WARNING):
        result = measure_latency(model, cfg)
    assert result["decode_compiled"] is None and result["decode"]["ms_per_token"]["runs"] >= 1
    assert any("compile=true failed on cpu" in note for note in result["notes"])
    assert "compile=true failed" in caplog.text
