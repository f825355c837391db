"""The `seed` step's layout and optimizer choices, measured per CPU class: what cnnlab keeps is what wins.

    .venv/bin/python benchmarks/fp32_path.py [--isa native|avx2] [--precision fp32|bf16] [--rounds 7]

Variants of the batch-64 `seed` step, each against cnnlab's choice, in interleaved rounds in one process
(each figure the median over rounds of the mean of `--steps` steps):
- memory layout: channels-last (NHWC) against PyTorch's default NCHW;
- Adam: fused (one kernel for all parameters) against foreach (a few multi-tensor kernels);
- pooling before ReLU (cnnlab's order: they commute, and pooling first leaves ReLU a quarter of the pixels)
  against the tutorial's ReLU then pooling.

`--isa avx2` caps PyTorch's kernels and oneDNN at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) before
torch loads: an emulation of an AVX2-only CPU (it does not change the cache sizes or the clock), where
`auto` precision is fp32. Writes benchmarks/results/fp32_path-<class>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ISA_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if "--isa" in sys.argv and sys.argv[sys.argv.index("--isa") + 1] == "avx2":
    os.environ.update(ISA_ENV)  # before torch is imported: both are read when the libraries load

import torch  # noqa: E402

from cnnlab import models  # noqa: E402
from cnnlab.device import keep_freed_memory  # noqa: E402
from cnnlab.doctor import training_step  # noqa: E402
from cnnlab.presets import SEED  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402


def variant(layout: str, adam: str, order: str):
    torch.manual_seed(0)
    model = models.build("seed")
    if order == "relu-pool":  # the tutorial's order: ReLU on the full-size maps, then pooling
        model.pool1, model.relu1 = model.relu1, model.pool1
        model.pool2, model.relu2 = model.relu2, model.pool2
    if layout == "channels-last":
        model = model.to(memory_format=torch.channels_last)
    opt = (make_optimizer(SEED, model) if adam == "fused" else
           torch.optim.Adam(model.parameters(), lr=SEED.lr, eps=SEED.eps, foreach=True))
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from common import cpu_class, machine, save

    keep_freed_memory()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    variants = {"cnnlab (channels-last, fused Adam, pool then ReLU)": ("channels-last", "fused", "pool-relu"),
                "NCHW": ("nchw", "fused", "pool-relu"),
                "foreach Adam": ("channels-last", "foreach", "pool-relu"),
                "ReLU then pool": ("channels-last", "fused", "relu-pool")}
    steps = {}
    for name, spec in variants.items():
        model, opt = variant(*spec)
        layout = torch.channels_last if spec[0] == "channels-last" else torch.contiguous_format
        steps[name] = training_step(model, opt, 64, dtype, layout=layout)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(5):
                step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    label = cpu_class() if args.isa == "native" else "avx2 (emulated)"
    base = statistics.median(times[next(iter(variants))])
    print(f"seed step, batch 64, {args.precision}, CPU class {label}; medians of {args.rounds} rounds")
    rows = {}
    for name, t in times.items():
        ms = statistics.median(t)
        rows[name] = {"ms": round(ms, 2), "relative_to_cnnlab": round(ms / base, 3), "rounds": [round(v, 3) for v in t]}
        print(f"  {name:<52}{ms:7.2f} ms  {ms / base:5.2f}x")
    save(f"fp32_path-{'avx2-emulated' if args.isa == 'avx2' else cpu_class()}-{args.precision}",
         {"machine": machine(), "cpu_class": label, "precision": args.precision, "variants": rows})


if __name__ == "__main__":
    main()
