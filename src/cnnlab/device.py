"""Where and in what precision to compute: CUDA when present, bf16 where the hardware has it (on a GPU from
compute capability 8.0, fp16 with a gradient scaler below it), the CUDA kernel settings (`configure`), and
copies to a GPU that no step waits for (`to_device`)."""

from __future__ import annotations

import contextlib
import ctypes
import math
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
    """The device `name` means; a GPU always with its index (`cuda` is `cuda:0`), since some torch.cuda functions
    refuse a device without one (PyTorch 2.11's get_per_process_memory_fraction, found on the first GPU run)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnlabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def cpu_has_native_bf16(cpuinfo: Path = hardware.CPUINFO) -> bool:
    """Whether the CPU advertises bf16 arithmetic (AVX-512 BF16 or AMX); False where that is unknown."""
    return hardware.cpu_class(cpuinfo) == "avx512_bf16"


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 itself: compute capability 8.0 (Ampere) or later. (PyTorch's
    `torch.cuda.is_bf16_supported()` is also true on T4 and V100, where bf16 is emulated, far slower than fp16.)"""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the hardware computes it natively; on an older GPU fp16 (with a gradient scaler in
    training), on an older CPU fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if gpu_has_native_bf16(device) else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in PRECISIONS:
        raise CnnlabError(f"unknown precision {name!r}; use auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def precision_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """A hint when a half precision was asked for on a CPU that emulates it (about 7x slower than fp32), or
    bf16 on a GPU older than compute capability 8.0."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        return (f"warning: this CPU ({hardware.cpu_class()}) has no native {precision_name(dtype)} arithmetic; "
                "PyTorch emulates it, several times slower than fp32: --precision auto chooses fp32 here")
    if device.type == "cuda" and dtype == torch.bfloat16 and not gpu_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"warning: this GPU (compute capability {major}.{minor}) emulates bf16; --precision fp16 (or auto) "
                "computes in half precision natively, with a gradient scaler")
    return None


def configure(device: torch.device) -> None:
    """The kernel choices a CUDA run wants: cuDNN times its convolution algorithms once per input shape and
    keeps the fastest (the shapes of a training run repeat), and fp32 matrix products may use TF32 tensor
    cores. Nothing changes on a CPU, where fp32 stays bit-exact."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def precision_name(dtype: torch.dtype) -> str:
    return next(k for k, v in PRECISIONS.items() if v == dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(tree, device: torch.device):
    """`tree` (nested lists, tuples and NamedTuples of tensors and plain values) with its tensors on `device`,
    copied in one transfer per dtype (from pinned memory, not waited for) rather than one per tensor."""
    if device.type == "cpu":
        return tree
    tensors = []
    _map(tree, tensors.append)
    moved = {}
    for dtype in {t.dtype for t in tensors}:
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group]).pin_memory().to(device, non_blocking=True)
        views = flat.split([t.numel() for t in group])
        moved.update({id(t): v.view(t.shape) for t, v in zip(group, views, strict=True)})
    return _map(tree, lambda t: moved[id(t)])


def _map(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map(v, fn) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_map(v, fn) for v in tree)
    return tree


EVAL_SHARE = 1 / 16  # of a GPU's free memory for one evaluation batch's float inputs, all test-time views: the
# forward pass's activations take several times the input (not tuned: on the H200, `photos` at 128 px capped at
# 3% of the GPU, 1.8 times its images, evaluated within the cap with it)


def free_memory(device: torch.device) -> int:
    """Bytes this process can still take on GPU `device`: the GPU's free memory plus what PyTorch's cache holds
    unused, within the process's cap where one is set (torch.cuda.set_per_process_memory_fraction)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    reserved, allocated = torch.cuda.memory_reserved(index), torch.cuda.memory_allocated(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda index=None: 1.0)(index)
    return max(0, int(min(free + reserved - allocated, fraction * total - allocated)))


def eval_batch(batch_size: int, image: tuple[int, ...], device: torch.device, views: int = 1) -> int:
    """The evaluation batch for images of shape `image` (C, H, W): on a GPU, `batch_size` lowered until its float
    inputs over `views` test-time views take at most EVAL_SHARE of the free memory (1,000 images of 224 px are
    0.6 GB a view); on a CPU as given."""
    if device.type != "cuda":
        return batch_size
    free = free_memory(device)
    per_image = 4 * views * math.prod(image)
    return max(1, min(batch_size, int(EVAL_SHARE * free // per_image)))


@contextlib.contextmanager
def memory_named(batch_size: int | None, eval_batch_size: int):
    """An out-of-memory error inside (a GPU's, or the CPU allocator's) as one line that names the batch sizes
    to lower, instead of an internal error (`batch_size` None: an evaluation alone)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        where = "the GPU" if isinstance(e, torch.OutOfMemoryError) else "the machine"
        what = (f"batches of {batch_size} images (training) and {eval_batch_size} (evaluation): lower --batch-size "
                "or --eval-batch-size" if batch_size is not None else
                f"evaluation batches of {eval_batch_size} images: lower --eval-batch-size (training)")
        raise CnnlabError(f"{where} ran out of memory with {what}, or use --image-size smaller "
                          f"({str(e).splitlines()[0][:120]})") from None


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
