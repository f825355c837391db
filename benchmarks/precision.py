"""What bf16 autocast costs in accuracy: the same recipe and seeds trained in bf16 and in fp32.

    .venv/bin/python benchmarks/precision.py [--preset quick] [--epochs 4] [--seeds 3]

airbench reaches 94% in fp16 on GPUs; on this CPU the fast path is bf16, which keeps 3 fewer mantissa
bits. This runs a preset (by default `quick` lengthened to 4 epochs, about 81%, where a precision loss
would show) for each seed in both precisions, and prints test accuracy and training time for each.
Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import machine, save, train_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    host = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for precision in ("bf16", "fp32"):
                run = train_run(args.preset, Path(tmp) / f"{precision}-{seed}", "--epochs", str(args.epochs),
                                "--seed", str(seed), "--precision", precision, "--no-report")
                rows.append({"seed": seed, "precision": precision, "test_accuracy": round(run["test_accuracy"], 4),
                             "train_seconds": run["train_seconds"]})
                print(f"seed {seed} {precision}: {run['test_accuracy']:.2%} in {run['train_seconds']} s", flush=True)
    summary = {}
    for precision in ("bf16", "fp32"):
        mine = [r for r in rows if r["precision"] == precision]
        summary[precision] = {"test_accuracy_mean": round(statistics.mean(r["test_accuracy"] for r in mine), 4),
                              "train_seconds_mean": round(statistics.mean(r["train_seconds"] for r in mine), 1)}
    result = {"machine": host, "data": "CIFAR-10 (JPEG copy)", "preset": args.preset, "epochs": args.epochs,
              "runs": rows, "summary": summary,
              "bf16_minus_fp32_points": round(100 * (summary["bf16"]["test_accuracy_mean"]
                                                     - summary["fp32"]["test_accuracy_mean"]), 2)}
    print(json.dumps(result, indent=2))
    save("precision", result)


if __name__ == "__main__":
    main()
