"""Training images per second per model and precision, and the achieved FLOP/s against this CPU's peak.

    .venv/bin/python benchmarks/throughput.py [--steps 6]

FLOPs per step are counted by torch.utils.flop_counter (forward + backward of convolutions and matrix
products; element-wise work is not counted). The peak is estimated as cores x clock x FLOPs per cycle:
AVX-512 with two 512-bit FMA pipes gives 64 fp32 FLOPs per cycle per core, and AVX-512 BF16 dot products
twice that. The clock (--ghz, default 3.7) is the boost clock a bf16 matrix product implies here: the best
of five 2048x2048 products reached 946 GFLOP/s on 2 cores, which needs at least 3.7 GHz at 128 FLOPs
per cycle. That matmul figure is measured again and reported beside the estimate.
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab import models
from cnnlab.device import PRECISIONS
from common import machine, save, training_step

CASES = [("seed", 64), ("seed", 256), ("airbench-s", 256), ("airbench94", 512)]
FLOPS_PER_CYCLE = {"fp32": 64, "bf16": 128}  # per core, AVX-512: 2 FMA pipes x 16 lanes x 2 (bf16: x2 again)


def train_step_rate(name: str, batch: int, dtype: torch.dtype, steps: int) -> tuple[float, float]:
    """(images per second, FLOPs per step) of SGD training steps on random data."""
    torch.manual_seed(0)
    model = models.build(name).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    step = training_step(model, opt, batch, dtype)
    with FlopCounterMode(display=False) as counter:
        step()
    step()  # warm-up: oneDNN picks its kernels on the first calls
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    return batch / seconds, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ghz", type=float, default=3.7, help="clock for the peak estimate")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    peaks = {p: cores * args.ghz * 1e9 * FLOPS_PER_CYCLE[p] for p in ("fp32", "bf16")}
    host = machine()  # its matrix-product probe is the measured counterpart of the estimate
    rows = []
    for name, batch in CASES:
        for precision in ("fp32", "bf16"):
            rate, flops = train_step_rate(name, batch, PRECISIONS[precision], args.steps)
            achieved = rate / batch * flops
            rows.append({"model": name, "batch": batch, "precision": precision, "images_per_s": round(rate),
                         "gflop_per_image": round(flops / batch / 1e9, 4), "achieved_gflops": round(achieved / 1e9, 1),
                         "fraction_of_peak": round(achieved / peaks[precision], 3)})
            print(f"{name:<11} batch {batch:<4} {precision}: {rate:8,.0f} img/s  {achieved / 1e9:6.1f} GFLOP/s "
                  f"({achieved / peaks[precision]:.0%} of the {peaks[precision] / 1e9:.0f} GFLOP/s peak)",
                  flush=True)
    result = {"machine": host, "peak_gflops_estimate": {k: round(v / 1e9, 1) for k, v in peaks.items()},
              "peak_method": f"{cores} cores x {args.ghz} GHz x FLOPs per cycle {FLOPS_PER_CYCLE}",
              "matmul_gflops_measured": host["matmul_gflops_now"], "cases": rows}
    print(json.dumps(result, indent=2))
    save("throughput", result)


if __name__ == "__main__":
    main()
