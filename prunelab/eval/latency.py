"""Inference latency: prefill throughput and per-token decode time, measured separately.

The timing machinery is ``torch.utils.benchmark``: after the warm-up calls, ``Timer.blocked_autorange``
times about ``repeats`` calls (the timer synchronizes the accelerator and runs with the process's thread
count), and the Measurement's median and interquartile range are what we report.

* Prefill: one forward over ``batch_size x length`` random token ids (a fresh KV cache is written, only the
  last position's logits are computed, as ``generate`` does), reported as tokens per second.
* Decode: greedy ``generate`` of exactly ``decode_tokens`` new tokens (no early stop) and of exactly one
  new token after the same prompt. The one-token call is the prefill plus ``generate``'s set-up, so the
  difference divided by ``decode_tokens - 1`` is the time of one decode step:
  ``ms/token = (t_generate(n) - median t_generate(1)) / (n - 1)`` for each sample of ``t_generate(n)``.
  With ``compile=true`` the decode runs with ``cache_implementation="static"`` and transformers' compiled
  forward (``torch.compile``; on CUDA CompileConfig's defaults, inductor with CUDA graphs, on a CPU inductor
  without them). The result says whether it compiled.
* ``sparse_kernels=true`` swaps every Linear weight that follows the 2:4 pattern to
  ``torch.sparse.to_sparse_semi_structured`` for the measurement (CUDA, fp16/bf16) and restores the dense
  weights afterwards. When that is impossible the result says so in ``kernels`` (and the log warns).

Token values do not change the cost of a dense or sparse forward, so inputs are random.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import nn
from torch.utils import benchmark
from torch.utils.benchmark.utils.timer import timer as clock

from prunelab.progress import progress
from prunelab.device import device_info

log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- helpers
def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, label: str = "",
               description: str = "") -> benchmark.Measurement:
    """``warmup`` untimed calls of ``fn`` (at least one), then ``Timer.blocked_autorange`` for about
    ``repeats`` calls' worth of time.

    The last untimed call's duration sets ``min_run_time = repeats x duration``, so the Measurement holds
    about ``repeats`` samples (one call each unless calls are too short for the timer's resolution, then
    blocks of calls). The timer synchronizes the accelerator and runs with the current
    ``torch.get_num_threads()`` (its own default would be 1).
    """
    duration = 0.0
    for _ in range(max(warmup, 1)):
        start = clock()
        fn()
        duration = clock() - start
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label or "call", description=description or None,
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=repeats * duration)


def summarize(samples: "benchmark.Measurement | list[float]", scale: float = 1.0) -> dict[str, Any]:
    """Median, interquartile range, min, max and the samples of a Measurement (or of a list of samples),
    each multiplied by ``scale`` (1000: seconds to milliseconds)."""
    if isinstance(samples, benchmark.Measurement):
        measurement = samples
    else:
        if not samples:
            raise ValueError("no timing samples to summarize")
        measurement = benchmark.Measurement(1, list(samples), benchmark.utils.common.TaskSpec("samples", "pass"))
    times = [scale * t for t in measurement.times]
    return {"median": scale * measurement.median, "iqr": scale * measurement.iqr, "min": min(times),
            "max": max(times), "runs": len(times), "samples": times}


def check_latency_config(cfg: Any) -> None:
    """Refuse latency settings that cannot give a measurement (raises ValueError naming the key); the
    runner calls it before the model loads."""
    if int(cfg.batch_size) < 1:
        raise ValueError(f"eval.latency.batch_size={cfg.batch_size} must be >= 1")
    if not cfg.prefill_lengths or any(int(n) < 1 for n in cfg.prefill_lengths):
        raise ValueError(f"eval.latency.prefill_lengths={list(cfg.prefill_lengths)} must be a non-empty list of positive lengths")
    if int(cfg.decode_tokens) < 2:
        raise ValueError(f"eval.latency.decode_tokens={cfg.decode_tokens} must be >= 2 (decode time is measured between tokens)")
    if int(cfg.repeats) < 1 or int(cfg.warmup) < 0:
        raise ValueError(f"eval.latency.repeats={cfg.repeats} must be >= 1 and warmup={cfg.warmup} >= 0")


# ------------------------------------------------------------------------------------------ sparse kernels
def follows_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row holds at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1) <= 2).all())


def _semi_structured_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"device is {device.type}: semi-structured (2:4) sparse kernels need CUDA"
    if dtype not in SPARSE_DTYPES:
        return f"dtype is {str(dtype).removeprefix('torch.')}: semi-structured sparse kernels need float16 or bfloat16"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


@contextlib.contextmanager
def semi_structured_weights(model: nn.Module, enabled: bool, device: torch.device) -> Iterator[dict[str, Any]]:
    """Swap 2:4 Linear weights to semi-structured sparse tensors inside the block, restore them after.

    Yields a report: ``requested``, ``used`` ("semi_structured" or "dense"), ``reason`` (why dense kernels
    are used, if they are), ``swapped`` / ``eligible`` counts, ``skipped`` counts by reason, ``backend``
    and ``check_max_abs_err`` (one swapped layer's output against the dense matmul).
    """
    report: dict[str, Any] = {"requested": bool(enabled), "used": "dense", "reason": None, "swapped": 0,
                              "linears": 0, "skipped": {}, "backend": None}
    originals: dict[nn.Linear, nn.Parameter] = {}
    if not enabled:
        report["reason"] = "sparse_kernels=false"
        yield report
        return
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    report["linears"] = len(linears)
    dtype = next(model.parameters()).dtype
    reason = _semi_structured_unavailable(device, dtype)
    skipped: Counter[str] = Counter()
    check_err = None
    if reason is None:
        for module in linears:
            weight = module.weight
            if not follows_two_four(weight):
                skipped["weight is not 2:4 sparse"] += 1
                continue
            try:
                sparse = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
            except (RuntimeError, ValueError, NotImplementedError) as err:
                skipped[f"conversion refused: {str(err).splitlines()[0][:160]}"] += 1
                continue
            if check_err is None:  # the sparse matmul must reproduce the dense one
                x = torch.randn(64, weight.shape[1], dtype=weight.dtype, device=weight.device)
                with torch.no_grad():
                    check_err = float((nn.functional.linear(x, sparse) - nn.functional.linear(x, weight)).abs().max())
                report["backend"] = getattr(type(sparse), "BACKEND", type(sparse).__name__)
            originals[module] = weight
            module.weight = nn.Parameter(sparse, requires_grad=False)
        report["swapped"] = len(originals)
        report["skipped"] = dict(skipped)
        report["check_max_abs_err"] = check_err
        if not originals:
            reason = "no Linear weight could be swapped: " + (", ".join(f"{k} ({v})" for k, v in skipped.items()) or "none found")
    if originals:
        report["used"] = "semi_structured"
        log.info("sparse kernels: %d of %d Linear weights swapped to semi-structured (%s); skipped %s",
                 len(originals), len(linears), report["backend"], dict(skipped) or "none")
    else:
        report["reason"] = reason
        log.warning("sparse_kernels=true but DENSE kernels are used: %s", reason)
    try:
        yield report
    finally:
        for module, weight in originals.items():
            module.weight = weight


# ----------------------------------------------------------------------------------------------- prefill
def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def measure_prefill(model: nn.Module, length: int, batch_size: int, warmup: int, repeats: int,
                    device: torch.device, vocab_size: int, generator: torch.Generator) -> dict[str, Any]:
    """Time ``repeats`` forwards over ``batch_size x length`` random tokens after ``warmup`` untimed ones."""
    kwargs = _forward_kwargs(model)
    ids = torch.randint(vocab_size, (batch_size, length), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measurement = time_calls(lambda: model(input_ids=ids, use_cache=True, **kwargs), warmup, repeats,
                             label="prefill", description=f"{batch_size}x{length}")
    tokens = batch_size * length
    stats = summarize(measurement)
    entry = {
        "length": length,
        "tokens": tokens,
        "seconds": stats,
        "tokens_per_s": {"median": tokens / stats["median"], "min": tokens / stats["max"], "max": tokens / stats["min"]},
        "logits": "last position only" if kwargs else "all positions",
    }
    if device.type == "cuda":
        entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return entry


# ------------------------------------------------------------------------------------------------ decode
def default_compile_config(device: torch.device) -> "transformers.CompileConfig":
    """transformers' CompileConfig for ``device``: its defaults on CUDA; on a CPU inductor without CUDA
    graphs (mode "default"), with the flag that lets transformers compile off accelerators."""
    if device.type == "cuda":
        return transformers.CompileConfig()
    config = transformers.CompileConfig(mode="default")
    config._compile_all_devices = True
    return config


@torch.no_grad()
def measure_decode(model: nn.Module, prompt_len: int, new_tokens: int, batch_size: int, warmup: int, repeats: int,
                   device: torch.device, vocab_size: int, generator: torch.Generator, compile: bool,
                   compile_config: "transformers.CompileConfig | None" = None) -> dict[str, Any]:
    """Greedy decode of exactly ``new_tokens`` tokens; ms per decode step from generate(n) - generate(1).

    ``compile=True`` asks for a static KV cache and transformers' compiled forward
    (``compile_config``; None = ``default_compile_config(device)``). The result says whether it compiled.
    """
    ids = torch.randint(vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    gen_kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                      pad_token_id=0, disable_compile=not compile)
    if compile:
        # transformers keeps its compiled forward in `_compiled_call`; drop a stale one so that `compiled`
        # below reports what this measurement did (dynamo's guards decide whether anything recompiles)
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        compile_config = compile_config or default_compile_config(device)
        gen_kwargs.update(cache_implementation="static", compile_config=compile_config)
    else:
        compile_config = None
        gen_kwargs.update(cache_implementation="dynamic")

    def generate(n: int) -> None:
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen_kwargs)
        if out.shape[1] != prompt_len + n:
            raise RuntimeError(f"generate produced {out.shape[1] - prompt_len} tokens instead of {n}: "
                               "early stop was not prevented")

    # compilation (and CUDA-graph recording) happen in the first calls: give them two untimed runs at least
    warmup_runs = max(warmup, 2) if compile else warmup
    label = f"decode ({'static' if compile else 'dynamic'} cache)"
    full = time_calls(lambda: generate(new_tokens), warmup_runs, repeats, label=label, description=f"{new_tokens} tokens")
    first = time_calls(lambda: generate(1), warmup, repeats, label=label, description="1 token")
    compiled = compile and getattr(model, "_compiled_call", None) is not None
    per_token = [(t - first.median) / (new_tokens - 1) for t in full.times]
    return {
        "mode": f"{'compiled' if compiled else 'eager'}, {'static' if compile else 'dynamic'} KV cache",
        "cache": "static" if compile else "dynamic",
        "compiled": compiled,
        "compile_config": compile_config.to_dict() if compile_config is not None else None,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "greedy": True,
        "warmup_runs": warmup_runs,
        "ms_per_token": summarize(per_token, scale=1000.0),
        "generate_ms": {str(new_tokens): summarize(full, scale=1000.0), "1": summarize(first, scale=1000.0)},
        "timing": f"per token = (time of generate({new_tokens}) - median time of generate(1)) / {new_tokens - 1}; "
                  "torch.utils.benchmark.Timer.blocked_autorange",
    }


def _compiled_decode(model: nn.Module, cfg: Any, prompt_len: int, device: torch.device, vocab_size: int,
                     generator: torch.Generator, notes: list[str]) -> dict[str, Any] | None:
    """The static-cache compiled decode, or None with a note when torch.compile cannot build it here."""
    try:
        decode = measure_decode(model, prompt_len, int(cfg.decode_tokens), int(cfg.batch_size), int(cfg.warmup),
                                int(cfg.repeats), device, vocab_size, generator, compile=True)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        notes.append(f"compile=true failed on {device.type} ({str(err).splitlines()[0][:200]}): no compiled decode")
        log.warning(notes[-1])
        return None
    finally:
        if hasattr(model, "_compiled_call"):
            del model._compiled_call  # later forwards (evaluation) stay eager
    if not decode["compiled"]:
        notes.append("compile=true but transformers did not compile the decode forward; decode_compiled is eager")
        log.warning(notes[-1])
    log.info("decode (%s): %.2f ms/token (median of %d)", decode["mode"], decode["ms_per_token"]["median"],
             int(cfg.repeats))
    return decode


# ---------------------------------------------------------------------------------------------- top level
def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def measure_latency(model: nn.Module, cfg: Any, device: str | torch.device | None = None,
                    decode_prompt_len: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Prefill throughput and decode time of a causal LM.

    Args:
        model: a transformers causal LM already on ``device`` (in eval mode for the measurement).
        cfg: ``LatencyConfig`` (batch_size, prefill_lengths, decode_tokens, warmup, repeats, compile,
            sparse_kernels).
        device: where the model lives; None = the device of its first parameter.
        decode_prompt_len: prompt length before decoding; None = the smallest prefill length.
        seed: seed of the random token ids.

    Returns:
        ``{"device", "dtype", "torch", "transformers", "batch_size", "warmup", "repeats", "inputs", "kernels",
        "prefill": {str(length): {...}}, "decode": {...}, "decode_compiled": {...} or None, "notes": [...]}``
        (seconds / tokens per second / milliseconds per token as median, iqr, min, max and the samples).
        ``decode`` is eager with a dynamic KV cache; ``decode_compiled`` (only with ``cfg.compile``) uses a
        static KV cache and torch.compile.

    Raises:
        ValueError: a bad config value, or a model that is not on ``device``.
    """
    check_latency_config(cfg)
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if _model_device(model) != device:
        raise ValueError(f"the model is on {_model_device(model)} but latency was asked for {device}; "
                         f"move it first (model.to(device)) or pass device={_model_device(model)}")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab_size = int(text_config.vocab_size)
    lengths = [int(n) for n in cfg.prefill_lengths]
    prompt_len = int(decode_prompt_len) if decode_prompt_len is not None else min(lengths)
    max_pos = getattr(text_config, "max_position_embeddings", None)
    notes: list[str] = []
    if max_pos and max(max(lengths), prompt_len + int(cfg.decode_tokens)) > max_pos:
        notes.append(f"some lengths exceed max_position_embeddings={max_pos}: timings are valid, outputs are not")
    compile = bool(cfg.compile)
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with semi_structured_weights(model, bool(cfg.sparse_kernels), device) as kernels:
            prefill = {}
            for length in progress(lengths, desc="latency: prefill", leave=False):
                prefill[str(length)] = measure_prefill(model, length, int(cfg.batch_size), int(cfg.warmup),
                                                       int(cfg.repeats), device, vocab_size, generator)
                log.info("prefill %d x %d: %.1f tokens/s (median of %d)", int(cfg.batch_size), length,
                         prefill[str(length)]["tokens_per_s"]["median"], int(cfg.repeats))
            decode = measure_decode(model, prompt_len, int(cfg.decode_tokens), int(cfg.batch_size), int(cfg.warmup),
                                    int(cfg.repeats), device, vocab_size, generator, compile=False)
            log.info("decode (%s): %.2f ms/token (median of %d)", decode["mode"], decode["ms_per_token"]["median"],
                     int(cfg.repeats))
            decode_compiled = _compiled_decode(model, cfg, prompt_len, device, vocab_size, generator, notes) if compile else None
            if kernels["requested"] and kernels["used"] == "dense":
                notes.append(f"sparse_kernels=true fell back to dense kernels: {kernels['reason']}")
    finally:
        model.train(was_training)
    return {
        "device": device_info(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_size": int(cfg.batch_size),
        "warmup": int(cfg.warmup),
        "repeats": int(cfg.repeats),
        "inputs": f"random token ids (uniform over {vocab_size}, seed {seed})",
        "kernels": kernels,
        "prefill": prefill,
        "decode": decode,
        "decode_compiled": decode_compiled,
        "notes": notes,
    }
