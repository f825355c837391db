"""When each test-accuracy threshold is first reached: the `quick` recipe (and `fast` with --full).

    .venv/bin/python benchmarks/time_to_accuracy.py [--full] [--seeds 3] [--keras]

Times are cumulative training wall-clock seconds at the end of the epoch where the threshold was first
reached, measured after the decoded-image cache exists (evaluation excluded). With --keras (needs
`make bench-keras`), the tutorial's 15-epoch Keras run is timed in the same run, for the `quick` target
of at most 1/20 of it. Writes benchmarks/results/time_to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import DATA, KERAS_PYTHON, SHARED, machine, run, save, train_run

THRESHOLDS = [0.60, 0.68, 0.80, 0.90, 0.93, 0.94]


def reached(history: list[dict]) -> dict[str, float | None]:
    out, elapsed = {}, 0.0
    times = []
    for h in history:
        elapsed += h["seconds"]
        times.append((elapsed, h["val_acc"]))
    for t in THRESHOLDS:
        out[f"{t:.0%}"] = next((round(s, 1) for s, acc in times if acc >= t), None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run the `fast` recipe (about 10 min a seed)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per recipe (the mean is reported)")
    parser.add_argument("--keras", action="store_true", help="time the tutorial's Keras code too")
    args = parser.parse_args()
    result = {"machine": machine(), "data": "CIFAR-10 (JPEG copy)", "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keras:
            if not KERAS_PYTHON.exists():
                sys.exit("TensorFlow is not installed: run `make bench-keras` first")
            log = Path(tmp) / "keras.log"
            run([str(KERAS_PYTHON), str(SHARED / "bench" / "seed_keras.py"), "15", str(DATA)], log)
            keras = json.loads(next(ln for ln in reversed(log.read_text().splitlines()) if ln.startswith("{")))
            result["keras_15_epochs"] = {"train_seconds": keras["train_s"], "test_accuracy": keras["test_acc"]}
        for preset in ["quick"] + (["fast"] if args.full else []):
            runs = [train_run(preset, Path(tmp) / f"{preset}-{seed}", "--seed", str(seed))
                    for seed in range(args.seeds)]
            for r in runs:
                print(f"{preset}: {r['test_accuracy']:.4f} in {r['train_seconds']} s, peak RSS {r['peak_rss_mb']} MB",
                      flush=True)
            accs = [r["test_accuracy"] for r in runs]
            result["recipes"][preset] = {
                "seeds": args.seeds, "test_accuracy_mean": round(statistics.mean(accs), 4),
                "test_accuracy_each": [round(a, 4) for a in accs],
                "train_seconds_mean": round(statistics.mean(r["train_seconds"] for r in runs), 1),
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
                "first_reached_s": [reached(r["history"]) for r in runs]}
    if "keras_15_epochs" in result:
        quick = result["recipes"]["quick"]["train_seconds_mean"]
        result["quick_fraction_of_keras_time"] = round(quick / result["keras_15_epochs"]["train_seconds"], 4)
    print(json.dumps(result, indent=2))
    save("time_to_accuracy", result)


if __name__ == "__main__":
    main()
