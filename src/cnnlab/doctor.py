"""`cnnlab doctor`: what this machine is, how cnnlab will use it, and how fast it trains here.

    cnnlab doctor          # a few seconds: CPU, GPU, threads, precision, measured rates, expected times
    cnnlab doctor --json

The rates are measured on the spot (a matrix product, and training steps of the `seed`, `quick` and
`fast` networks on random images); the expected times multiply them by each preset's steps on CIFAR-10's
50,000 training images. They cover the training steps only: loading, validation and the report come on
top (the README's benchmark tables have whole runs).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from cnnlab import hardware, models, presets
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import Normalization
from cnnlab.device import cpu_has_native_bf16, pick_device, pick_precision, precision_name
from cnnlab.training import threads
from cnnlab.training.optim import make_optimizer
from cnnlab.training.state import TrainState
from cnnlab.training.step import Step

CIFAR_TRAIN = 50_000
# (preset, batch the step is timed at): fast's batch of 1024 takes seconds a step on a CPU, so its step is
# timed at 128 and scaled by the batch (its convolutions' cost is linear in the batch).
TIMED = (("seed", 64), ("quick", 256), ("fast", 128))


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: int, dtype: torch.dtype,
                  device: torch.device = torch.device("cpu"), layout: torch.memory_format = torch.channels_last,
                  cfg: TrainConfig | None = None, image: tuple[int, int, int] = (3, 32, 32), classes: int = 10):
    """One training step on a fixed random batch of `image`-shaped inputs (C, H, W), through the training loop's
    own `Step` (training/step.py): channels-last, autocast, the device-side non-finite guard, the totals added
    on the device."""
    x = torch.randn(batch, *image, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, classes, (batch,), device=device)
    cfg = cfg or TrainConfig()
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                       torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), None, Normalization(), device)
    step = Step(cfg, device, dtype, steps_per_epoch=1)
    step.wrap(model)
    model.train()
    return lambda: step(state, x, y, 0)


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of the best of `reps` square matrix products: what the cores deliver at this moment."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = math.inf
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item(): wait for a GPU to finish
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def preset_step(cfg: TrainConfig, batch: int, device: torch.device, dtype: torch.dtype,
                image: tuple[int, int, int] = (3, 32, 32), classes: int = 10):
    """One training step of `cfg`'s network (seeded) and optimizer at `batch` (training_step): what
    `step_seconds` times, and what benchmarks/gpu_check.py profiles."""
    torch.manual_seed(0)
    model = models.build(cfg.model, image[0], classes, image[1:]).to(device).to(memory_format=torch.channels_last)
    return training_step(model, make_optimizer(replace(cfg, batch_size=batch), model), batch, dtype, device,
                         image=image, classes=classes)


@threads.keeps_thread_count  # the governor's choice ends with the measurement: a budget's runs follow in-process
def step_seconds(cfg: TrainConfig, batch: int, device: torch.device, dtype: torch.dtype, seconds: float = 1.0,
                 image: tuple[int, int, int] = (3, 32, 32), classes: int = 10, least: int = 3) -> float:
    """Median time of one training step of `cfg`'s network and optimizer on `image`-shaped inputs (C, H, W),
    measured for about `seconds` (at least `least` steps after the warm-up); the thread count is left as found."""
    step = preset_step(cfg, batch, device, dtype, image, classes)
    governor = threads.ThreadGovernor(every=0.25)  # the thread count training would run with now
    warm = time.perf_counter() + (0.6 if governor.enabled else 0)
    while True:  # warm-up: first-call allocations and kernel choices, and the governor's first looks
        step()
        if governor.tick() and time.perf_counter() > warm:
            break
    times, end = [], time.perf_counter() + seconds
    while len(times) < least or (time.perf_counter() < end and len(times) < 50):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def why_precision(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        return f"{precision_name(dtype)}: what this GPU computes natively"
    if cpu_has_native_bf16():
        return "bf16: the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX); measured as accurate as fp32"
    return ("fp32: this CPU has no native bf16 (AVX-512 BF16 or AMX); bf16 would be emulated and several times "
            "slower")


def machine() -> dict:
    """What the machine is and how cnnlab will run on it (no measurement)."""
    flags = hardware.cpu_flags()
    device = pick_device("auto")
    dtype = pick_precision("auto", device)
    gpus = [gpu(i) for i in range(torch.cuda.device_count())] if device.type == "cuda" else []
    governed = threads.governed()
    return {
        "cpu": {"model": hardware.cpu_model(), "cores": hardware.usable_cores(), "class": hardware.cpu_class(),
                "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags or "amx_bf16" in flags},
        "gpu": gpus,
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads(),
                  "interop_threads": torch.get_num_interop_threads(), "parallel": torch.__config__.parallel_info()
                  .split("ATen parallel backend:")[-1].strip().splitlines()[0],
                  "user_settings": threads.user_settings(), "thread_governor": governed},
        "device": str(device), "precision": precision_name(dtype), "precision_why": why_precision(device, dtype),
    }


def gpu(index: int) -> dict:
    """A CUDA GPU's name, memory and compute capability, and whether it computes bf16 natively (8.0 on)."""
    p = torch.cuda.get_device_properties(index)
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "native_bf16": (p.major, p.minor) >= (8, 0)}


def measure(info: dict, seconds: float = 1.0) -> dict:
    """Rates measured now, and the expected training time of each timed preset on CIFAR-10."""
    device, dtype = torch.device(info["device"]), pick_precision("auto", torch.device(info["device"]))
    rates = {"fp32": matmul_gflops(torch.float32, device)}
    if dtype != torch.float32:
        rates[precision_name(dtype)] = matmul_gflops(dtype, device)
    steps, expected = {}, {}
    for name, batch in TIMED:
        cfg = presets.get(name)
        batch = cfg.batch_size if device.type == "cuda" else batch  # a GPU's step time is not linear in the batch
        ms = step_seconds(cfg, batch, device, dtype, seconds) * 1000 * cfg.batch_size / batch
        steps[name] = {"ms_per_step": round(ms, 2), "batch": cfg.batch_size, "timed_at_batch": batch,
                       "images_per_s": round(cfg.batch_size / ms * 1000)}
        expected[name] = round(math.ceil(CIFAR_TRAIN / cfg.batch_size) * cfg.epochs * ms / 1000, 1)
    return {"matmul_gflops": {k: round(v, 1) for k, v in rates.items()}, "steps": steps,
            "expected_train_seconds": expected}


def report(seconds: float = 1.0) -> dict:
    info = machine()
    info["measured"] = measure(info, seconds)
    return info


def describe_gpu(g: dict) -> str:
    return (f"{g['name']} ({g['memory_gib']} GiB, compute capability {g['capability']}, "
            f"{'native bf16' if g['native_bf16'] else 'no native bf16: fp16 with a gradient scaler'})")


def format_report(info: dict) -> str:
    cpu, t, m = info["cpu"], info["torch"], info["measured"]
    has = ", ".join(k.upper().replace("_", "-") for k in ("avx2", "avx512f", "avx512_bf16", "amx") if cpu[k])
    gov = ("on: threads follow the cores other processes leave free" if t["thread_governor"]
           else f"off ({', '.join(f'{k}={v}' for k, v in t['user_settings'].items()) or 'CNNLAB_THREADS=keep'})")
    lines = [f"CPU        {cpu['model']}, {cpu['cores']} cores; {has or 'no AVX2'} (class {cpu['class']})",
             f"GPU        {', '.join(describe_gpu(g) for g in info['gpu']) or 'none'}",
             f"torch      {t['version']}, {t['threads']} threads ({t['parallel']}), {t['interop_threads']} inter-op",
             f"governor   {gov}",
             f"device     {info['device']}",
             f"precision  {info['precision_why']}",
             "matmul     " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in m["matmul_gflops"].items())]
    for name, s in m["steps"].items():
        scaled = f" (timed at {s['timed_at_batch']}, scaled)" if s["timed_at_batch"] != s["batch"] else ""
        lines.append(f"{name + ' step':<11}{s['ms_per_step']:,.1f} ms at batch {s['batch']}{scaled}: "
                     f"{s['images_per_s']:,} images/s")
    for name, sec in m["expected_train_seconds"].items():
        cfg = presets.get(name)
        lines.append(f"{'expected':<11}{name}: {_duration(sec)} of training ({cfg.epochs} epoch"
                     f"{'s' * (cfg.epochs != 1)} of CIFAR-10)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
