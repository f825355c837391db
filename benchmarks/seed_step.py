"""Where the time of one `seed` training step goes, and what bounds it on this CPU.

    .venv/bin/python benchmarks/seed_step.py [--rounds 5] [--steps 100] [--compile]

The tutorial's network at batch 64 in bf16, as `cnnlab train --preset seed` runs it, against variants that
remove one kind of work after another. The variants run in interleaved rounds in one process and each figure is
the median over rounds: this host's speed drifts by 20% from one minute to the next, so only figures
taken side by side compare.

- step: the real step (autocast bf16, channels-last, fused Adam).
- without the optimizer: forward and backward only; the difference is Adam.
- without the dense layers: forward and backward of conv1, pool, ReLU, conv2, pool, ReLU, with the mean
  of the features as the loss; the difference is the dense head (flatten, two layers, cross-entropy).
- convolutions alone: conv1's weight gradient and conv2's forward and both gradients at the step's shapes;
  the difference to the previous line is pooling, ReLU and the bf16 casts.
- one thread, half batch: the work of one core if the batch were split between the cores instead of each
  operation; twice its images/s is what two single-threaded workers would reach with no overhead.
- compiled (--compile): the step under torch.compile.

The arithmetic floor is the step's FLOPs (torch.utils.flop_counter) at the rate of the bf16 matrix-product
probe taken at the start. Writes benchmarks/results/seed_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnlab import models
from cnnlab.device import keep_freed_memory
from cnnlab.presets import SEED
from cnnlab.training.optim import make_optimizer
from common import HERE, machine, save, training_step

BATCH = 64


def seed_step(batch: int = BATCH, compiled: bool = False):
    torch.manual_seed(0)
    model = models.build("seed").to(memory_format=torch.channels_last)
    opt = make_optimizer(SEED, model)
    return training_step(torch.compile(model) if compiled else model, opt, batch, torch.bfloat16)


def forward_backward(dense_layers: bool):
    model = models.build("seed").to(memory_format=torch.channels_last)
    net = model if dense_layers else nn.Sequential(*list(model.children())[:6])  # up to relu2
    x = torch.rand(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            out = net(x).float()
        (F.cross_entropy(out, y) if dense_layers else out.mean()).backward()

    return step


def convolutions_alone():
    model = models.build("seed").to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    h = torch.rand(BATCH, 32, 16, 16).contiguous(memory_format=torch.channels_last).bfloat16().requires_grad_()

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16):
            a, b = model.conv1(x), model.conv2(h)
        torch.autograd.backward([a, b], [torch.ones_like(a), torch.ones_like(b)])

    return step


def one_thread(step):
    def run() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            step()
        finally:
            torch.set_num_threads(threads)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="also time the step under torch.compile")
    args = parser.parse_args()
    keep_freed_memory()  # as cnnlab train does on the CPU
    host = machine()
    with FlopCounterMode(display=False) as counter:
        seed_step()()
    flops = counter.get_total_flops()
    variants = {"step": seed_step(), "without the optimizer": forward_backward(dense_layers=True),
                "without the dense layers": forward_backward(dense_layers=False),
                "convolutions alone": convolutions_alone(),
                "one thread, half batch": one_thread(seed_step(BATCH // 2))}
    if args.compile:
        variants["compiled"] = seed_step(compiled=True)
    for step in variants.values():
        for _ in range(10):  # oneDNN picks its kernels, torch.compile builds, on the first calls
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    ms = {name: round(statistics.median(t), 2) for name, t in times.items()}
    floor = flops / (host["matmul_gflops_now"]["bf16"] * 1e9) * 1e3
    for name, value in ms.items():
        print(f"{name:<26} {value:6.2f} ms  (rounds: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"{flops / 1e9:.2f} GFLOP a step: {floor:.2f} ms at the probe's {host['matmul_gflops_now']['bf16']} "
          f"GFLOP/s bf16")
    result = {"machine": host, "batch": BATCH, "precision": "bf16", "rounds": args.rounds,
              "steps_per_round": args.steps, "median_ms": ms, "all_ms": times,
              "gflop_per_step": round(flops / 1e9, 3), "arithmetic_floor_ms": round(floor, 2)}
    keras = HERE / "results" / "vs_keras.json"
    if keras.exists():  # what 3x the Keras code would need, from the last vs_keras run
        k = json.loads(keras.read_text())
        steps = -(-50_000 // BATCH)
        result["step_ms_for_3x_keras"] = round(k["keras"]["seconds_per_epoch"] / 3 / steps * 1e3, 2)
        result["keras_run"] = k["machine"]["date"]
        print(f"3x the Keras code of {k['machine']['date']} ({k['keras']['seconds_per_epoch']} s an epoch) needs "
              f"{result['step_ms_for_3x_keras']} ms a step, data path included")
    save("seed_step", result)


if __name__ == "__main__":
    main()
