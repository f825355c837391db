"""The tutorial's Keras code against cnnlab's `seed` preset, same data, same epochs, one run.

    make bench-keras                      # once: TensorFlow 2.21 into .venv-keras
    .venv/bin/python benchmarks/vs_keras.py [--epochs 15]

Prints seconds per epoch for both, the ratio, and both test accuracies; writes
benchmarks/results/vs_keras.json with the CPU class. Targets: cnnlab at least 3x faster per epoch on a CPU
with native bf16 (AVX-512 BF16), 2x on an AVX2-only CPU (fp32 both), accuracy within 1.5 points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import DATA, KERAS_PYTHON, SHARED, cpu_class, machine, run, save, train_run

SPEEDUP_TARGET = {"avx512_bf16": 3.0, "avx512f": 2.0, "avx2": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    if not KERAS_PYTHON.exists():
        sys.exit("TensorFlow is not installed: run `make bench-keras` first")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "keras.log"
        _, code, _ = run([str(KERAS_PYTHON), str(SHARED / "bench" / "seed_keras.py"), str(args.epochs), str(DATA)],
                         log)
        lines = log.read_text().splitlines()
        if code != 0:
            sys.exit("seed_keras.py failed:\n" + "\n".join(lines[-20:]))
        keras = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
        ours = train_run("seed", Path(tmp) / "seed", "--epochs", str(args.epochs))
    keras_epoch = keras["train_s"] / args.epochs
    ours_epoch = ours["train_seconds"] / args.epochs
    result = {
        "machine": machine(), "data": "CIFAR-10 (JPEG copy)", "epochs": args.epochs,
        "keras": {"seconds_per_epoch": round(keras_epoch, 2), "train_seconds": keras["train_s"],
                  "test_accuracy": keras["test_acc"], "peak_val_accuracy": max(keras["val_acc_per_epoch"])},
        "cnnlab_seed": {"seconds_per_epoch": round(ours_epoch, 2), "train_seconds": ours["train_seconds"],
                        "test_accuracy": round(ours["test_accuracy"], 4),
                        "peak_val_accuracy": round(max(h["val_acc"] for h in ours["history"]), 4)},
        "speedup_per_epoch": round(keras_epoch / ours_epoch, 2),
        "accuracy_difference_points": round(100 * (ours["test_accuracy"] - keras["test_acc"]), 2),
        "targets": {"speedup_at_least": SPEEDUP_TARGET.get(cpu_class()), "accuracy_within_points": 1.5},
        "note": "seconds are training wall time, validation excluded for cnnlab (Keras' fit includes it)",
    }
    print(json.dumps(result, indent=2))
    save("vs_keras", result)


if __name__ == "__main__":
    main()
