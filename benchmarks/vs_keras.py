"""The tutorial's Keras code against cnnlab's `seed` preset, same data, same epochs, side by side.

    make bench-keras                      # once: TensorFlow 2.21 into .venv-keras
    .venv/bin/python benchmarks/vs_keras.py [--epochs 15] [--rounds 1] [--isa native|avx2]

Each round trains the Keras code, then `cnnlab train --preset seed` (the order alternates between rounds, so
neither always runs on a machine the other has just warmed or loaded), and takes each one's seconds per
epoch: the median over the epochs after the first (the first carries TensorFlow's graph tracing and both
libraries' first-call allocations; with one epoch, that epoch). Keras' epochs are its own verbose lines
(ms/step x steps); they include its validation pass, which cnnlab's `seconds` leave out (cnnlab records
validation apart, `val_seconds`). Prints per round and the median ratio; writes
benchmarks/results/vs_keras-<class>.json with the CPU class.

`--isa avx2` caps PyTorch's kernels and oneDNN (which TensorFlow uses too) at AVX2 in both processes
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and trains cnnlab in fp32: an emulation of an AVX2-only CPU (it does
not change the caches or the clock). Targets: cnnlab at least 3x Keras per epoch where bf16 is native, 2.5x
on an AVX2-only CPU (fp32 both); accuracy within 1.5 points (at 15 epochs).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

ISA_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if "--isa" in sys.argv and sys.argv[sys.argv.index("--isa") + 1] == "avx2":
    os.environ.update(ISA_ENV)  # before torch is imported here, and inherited by both trainings

import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from common import DATA, KERAS_PYTHON, SHARED, cpu_class, machine, run, save, train_run  # noqa: E402

SPEEDUP_TARGET = {"avx512_bf16": 3.0, "avx512f": 2.5, "avx2": 2.5}
KERAS_EPOCH = re.compile(r"^(\d+)/\1 - .*?(\d+)ms/step")  # "782/782 - 86s - 110ms/step - accuracy: ..."


def keras_round(epochs: int, log: Path) -> dict:
    _, code, _ = run([str(KERAS_PYTHON), str(SHARED / "bench" / "seed_keras.py"), str(epochs), str(DATA)], log)
    lines = log.read_text().splitlines()
    if code != 0:
        sys.exit("seed_keras.py failed:\n" + "\n".join(lines[-20:]))
    result = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
    per_epoch = [int(m[1]) * int(m[2]) / 1000 for ln in lines if (m := KERAS_EPOCH.match(ln.strip()))]
    return {"epoch_seconds": per_epoch, "test_accuracy": result["test_acc"], "train_seconds": result["train_s"]}


def cnnlab_round(epochs: int, out: Path, isa: str) -> dict:
    extra = ["--precision", "fp32"] if isa == "avx2" else []
    result = train_run("seed", out, "--epochs", str(epochs), "--no-report", *extra)
    return {"epoch_seconds": [h["seconds"] for h in result["history"]], "test_accuracy": result["test_accuracy"],
            "train_seconds": result["train_seconds"]}


def steady(seconds: list[float]) -> float:
    """The median epoch after the first (the first alone when there is only one)."""
    return statistics.median(seconds[1:] or seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = parser.parse_args()
    if not KERAS_PYTHON.exists():
        sys.exit("TensorFlow is not installed: run `make bench-keras` first")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("keras", "cnnlab") if r % 2 == 0 else ("cnnlab", "keras")
            got = {name: keras_round(args.epochs, Path(tmp) / f"keras{r}.log") if name == "keras"
                   else cnnlab_round(args.epochs, Path(tmp) / f"seed{r}", args.isa) for name in order}
            ratio = steady(got["keras"]["epoch_seconds"]) / steady(got["cnnlab"]["epoch_seconds"])
            rounds.append({**got, "order": list(order), "speedup_per_epoch": round(ratio, 2)})
            print(f"round {r + 1}: Keras {steady(got['keras']['epoch_seconds']):.1f} s/epoch, cnnlab seed "
                  f"{steady(got['cnnlab']['epoch_seconds']):.1f} s/epoch: {ratio:.2f}x", flush=True)
    klass = cpu_class() + ("-avx2-emulated" if args.isa == "avx2" else "")
    result = {"machine": machine(), "cpu_class": klass, "isa_env": ISA_ENV if args.isa == "avx2" else {},
              "cnnlab_precision": "fp32" if args.isa == "avx2" else "auto", "data": "CIFAR-10 (JPEG copy)",
              "epochs": args.epochs, "rounds": rounds,
              "speedup_per_epoch_median": round(statistics.median(r["speedup_per_epoch"] for r in rounds), 2),
              "targets": {"speedup_at_least": 2.5 if args.isa == "avx2" else SPEEDUP_TARGET.get(cpu_class()),
                          "accuracy_within_points": 1.5},
              "note": "seconds per epoch: the median after the first epoch; Keras' include its validation pass, "
                      "cnnlab's do not (it records validation apart)"}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    save(f"vs_keras-{klass}", result)


if __name__ == "__main__":
    main()
