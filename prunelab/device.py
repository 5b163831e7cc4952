"""What decides a computation's floating-point result besides its inputs: the machine.

Two machines (or one machine with another thread count) can agree to float rounding and still
differ in the last bit: PyTorch's CPU kernels dispatch on the SIMD level (``cpu_capability``), MKL
picks its code path by CPU model and by the **memory alignment of its operands**, and parallel
reductions split by thread count. So:

- :func:`device_info` records the machine beside every number (results.json, latency records);
- :func:`arithmetic_identity` is the part of a cache key that keeps a value computed on one kind of
  machine from being served as if it had been computed on another (a cache folder shared over NFS);
- :func:`aligned` gives a tensor read from a file (safetensors views start at arbitrary offsets)
  the 64-byte alignment of a freshly allocated one, so a cached value feeds the same code path as
  the value it replaces.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

ALIGNMENT = 64  # bytes: PyTorch's CPU allocator aligns every allocation to this (c10::gAlignment)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """Where a run or a timing computed: the device's name, and what decides its summation order.

    On the CPU, the SIMD level PyTorch's kernels dispatch to (``cpu_capability``) and the thread count
    decide it, so two machines can agree to float rounding in a dense forward and still prune a few
    weights differently. On CUDA: the GPU, its compute capability, CUDA and cuSPARSELt versions.
    """
    info: dict[str, Any] = {"type": device.type, "cpu": platform.machine(), "cpu_name": cpu_name(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        info.update(index=index, name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                    cuda=torch.version.cuda,
                    cusparselt=torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)
    else:
        info["name"] = info["cpu_name"]
    return info


# the facts of ``device_info`` that change floating-point results (not the core count)
ARITHMETIC_KEYS = ("type", "cpu", "cpu_name", "cpu_capability", "torch_threads", "name", "capability", "cuda")


def arithmetic_identity(device: torch.device | dict[str, Any]) -> dict[str, Any]:
    """What of the machine decides the last bits of a result: a device, or a ``device_info`` record."""
    info = device_info(device) if isinstance(device, torch.device) else device
    return {key: info[key] for key in ARITHMETIC_KEYS if key in info}


def is_aligned(tensor: torch.Tensor) -> bool:
    """Contiguous and starting on an ``ALIGNMENT``-byte boundary, like a fresh allocation."""
    return tensor.is_contiguous() and tensor.data_ptr() % ALIGNMENT == 0


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when :func:`is_aligned`, else a contiguous copy in fresh (aligned) memory.

    MKL's LAPACK and BLAS routines may take another code path, and so round differently, for an
    operand that is not 64-byte aligned (its reproducibility notes say as much); a tensor viewed
    from a safetensors file usually is not. Cached statistics go through here before any solver
    sees them, so a run that reads them does the arithmetic of the run that computed them.
    """
    if tensor.device.type != "cpu" or is_aligned(tensor):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
