"""Inference latency: prefill throughput and per-token decode time, measured separately.

* Prefill: one forward over ``batch_size x length`` random token ids (a fresh KV cache is written, only the
  last position's logits are computed, as ``generate`` does), reported as tokens per second.
* Decode: greedy ``generate`` of exactly ``decode_tokens`` new tokens (no early stop) after a prompt; a
  logits processor stamps the time at which each token's logits are ready, so the prefill inside
  ``generate`` (first stamp) is split from the decode steps (later stamps). On CUDA with ``compile=true``
  the decode runs with ``cache_implementation="static"`` and transformers' compiled forward
  (``torch.compile``, CompileConfig defaults: inductor, mode ``reduce-overhead``).
* ``sparse_kernels=true`` swaps every Linear weight that follows the 2:4 pattern to
  ``torch.sparse.to_sparse_semi_structured`` for the measurement (CUDA, fp16/bf16) and restores the dense
  weights afterwards. When that is impossible the result says so in ``kernels`` (and the log warns).

Every timed region is bracketed by ``torch.cuda.synchronize(device)`` on CUDA. Token values do not
change the cost of a dense or sparse forward, so inputs are random.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import platform
import statistics
import time
from collections import Counter
from typing import Any, Iterator

import torch
import transformers
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from prunelab.progress import progress

log = logging.getLogger(__name__)

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- helpers
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, min, max and quartiles (inclusive method) of timing samples."""
    if not samples:
        raise ValueError("no timing samples to summarize")
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "q1": q1, "q3": q3,
            "runs": len(samples), "samples": list(samples)}


def device_info(device: torch.device) -> dict[str, Any]:
    """Name and capabilities of the device the timings come from."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "index": index, "name": torch.cuda.get_device_name(index),
                "capability": f"{major}.{minor}", "cuda": torch.version.cuda,
                "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _check_cfg(cfg: Any) -> None:
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
    for _ in range(warmup):
        model(input_ids=ids, use_cache=True, **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    tokens = batch_size * length
    stats = summarize(seconds)
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
class _TokenClock(LogitsProcessor):
    """Stamps the time at which each generated token's logits are ready (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def measure_decode(model: nn.Module, prompt_len: int, new_tokens: int, batch_size: int, warmup: int, repeats: int,
                   device: torch.device, vocab_size: int, generator: torch.Generator, compile: bool,
                   compile_config: "transformers.CompileConfig | None" = None) -> dict[str, Any]:
    """Greedy decode of exactly ``new_tokens`` tokens; ms per token from the 2nd to the last token.

    ``compile=True`` asks for a static KV cache and transformers' compiled forward; transformers compiles
    only on accelerators unless ``compile_config._compile_all_devices`` is set (default config:
    ``CompileConfig()``, inductor with mode reduce-overhead). The result says whether it compiled.
    """
    ids = torch.randint(vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    clock = _TokenClock(device)
    gen_kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
        disable_compile=not compile,
    )
    if compile:
        # transformers keeps its compiled forward in `_compiled_call`; drop a stale one so that `compiled`
        # below reports what this measurement did (dynamo's guards decide whether anything recompiles)
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        compile_config = compile_config or transformers.CompileConfig()
        gen_kwargs.update(cache_implementation="static", compile_config=compile_config)
    else:
        compile_config = None
        gen_kwargs.update(cache_implementation="dynamic")

    def run() -> tuple[float, list[float]]:
        clock.stamps.clear()
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, **gen_kwargs)
        synchronize(device)
        if out.shape[1] != prompt_len + new_tokens or len(clock.stamps) != new_tokens:
            raise RuntimeError(f"generate produced {out.shape[1] - prompt_len} tokens ({len(clock.stamps)} steps) "
                               f"instead of {new_tokens}: early stop was not prevented")
        return start, list(clock.stamps)

    # compilation and CUDA-graph recording happen in the first calls: give them two untimed runs at least
    warmup_runs = max(warmup, 2) if compile else warmup
    for _ in range(warmup_runs):
        run()
    compiled = compile and getattr(model, "_compiled_call", None) is not None
    ms_per_token, prefill_ms = [], []
    for _ in range(repeats):
        start, stamps = run()
        prefill_ms.append(1000 * (stamps[0] - start))
        ms_per_token.append(1000 * (stamps[-1] - stamps[0]) / (new_tokens - 1))
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
        "ms_per_token": summarize(ms_per_token),
        "prefill_ms_in_generate": summarize(prefill_ms),
        "timing": "per token = (time of last token's logits - time of first token's logits) / (new_tokens - 1), "
                  "device synchronized at each token",
    }


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
        "prefill": {str(length): {...}}, "decode": {...}, "notes": [...]}`` (seconds / tokens per second /
        milliseconds per token as median, min, max, q1, q3 and the raw samples).

    Raises:
        ValueError: a bad config value, or a model that is not on ``device``.
    """
    _check_cfg(cfg)
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
    if compile and device.type != "cuda":
        notes.append(f"compile=true needs CUDA; device is {device.type}, so decode ran eager with a dynamic KV cache")
        log.warning(notes[-1])
        compile = False
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
                                    int(cfg.repeats), device, vocab_size, generator, compile)
            if kernels["requested"] and kernels["used"] == "dense":
                notes.append(f"sparse_kernels=true fell back to dense kernels: {kernels['reason']}")
            if compile and not decode["compiled"]:
                notes.append("compile=true but transformers did not compile the decode forward; timings are eager")
                log.warning(notes[-1])
            log.info("decode (%s): %.2f ms/token (median of %d)", decode["mode"], decode["ms_per_token"]["median"],
                     int(cfg.repeats))
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
        "notes": notes,
    }
