"""Where and in what precision to compute: CUDA when present, bf16 where the hardware has it."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from pathlib import Path

import torch

from cnnlab import hardware
from cnnlab.errors import CnnlabError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Denormal floats (below 1.2e-38) count as zero on the CPU once cnnlab has loaded this module, for training,
# evaluation and serving alike. As training goes on, some gradients and activations fall into the denormal
# range, where x86 CPUs compute each operation in microcode; TensorFlow flushes them in its CPU threads,
# PyTorch does not by default. Measured on the Intel AVX-512 BF16 host (11-25): `seed` epochs 2-4 took
# 8.3-9.3 s without and 6.7-7.9 s with it in four interleaved pairs of runs, with the same validation
# accuracy; an elementwise op on 8M denormals took 38.9 ms without, 5.4 ms with (both OpenMP threads
# flush). Nothing a weight update can resolve is that small. CNNLAB_DENORMALS=keep leaves PyTorch's default.
if os.environ.get("CNNLAB_DENORMALS") != "keep":
    torch.set_flush_denormal(True)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnlabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def cpu_has_native_bf16(cpuinfo: Path = hardware.CPUINFO) -> bool:
    """Whether the CPU advertises bf16 arithmetic (AVX-512 BF16 or AMX); False where that is unknown."""
    return hardware.cpu_class(cpuinfo) == "avx512_bf16"


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware computes it natively, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in PRECISIONS:
        raise CnnlabError(f"unknown precision {name!r}; use auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def precision_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """A hint when a half precision was asked for on a CPU that emulates it (about 7x slower than fp32)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        return (f"warning: this CPU ({hardware.cpu_class()}) has no native {precision_name(dtype)} arithmetic; "
                "PyTorch emulates it, several times slower than fp32: --precision auto chooses fp32 here")
    return None


def precision_name(dtype: torch.dtype) -> str:
    return next(k for k, v in PRECISIONS.items() if v == dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep the memory that training frees, rather than hand it back to the OS every step.

    A CPU training step allocates and frees the same activation-sized blocks each time. By default glibc
    returns large blocks to the OS (munmap, heap trimming) and the next step faults them in again, page by
    page. Measured here on the `quick` recipe (airbench-s, batch 256): 15.0 -> 13.0 s an epoch and 6.0 -> 1.8 s
    of system time. The cost is that the process' resident size stays near its peak. Returns whether it applied.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        applied = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: only blocks above 32 MB are mapped
        return bool(applied and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))  # trim only beyond 1 GB of free heap
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
