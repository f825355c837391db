"""When each test-accuracy threshold is first reached: the `quick` recipe (and `fast` with --full).

    .venv/bin/python benchmarks/time_to_accuracy.py [--full] [--seeds 3] [--keras]
    .venv/bin/python benchmarks/time_to_accuracy.py --recipes fast --seeds 1 --first-seed 2   # add one seed

Times are cumulative training wall-clock seconds at the end of the epoch where the threshold was first
reached, measured after the decoded-image cache exists (evaluation excluded). With --keras (needs
`make bench-keras`), the tutorial's 15-epoch Keras run is timed in the same run, for the `quick` target
of at most 1/20 of it.

A `fast` seed takes 15-30 minutes here, so seeds may come from separate runs: the results file keeps one
record per recipe and seed (with its date, CPU and the host's matmul rate at the time), a new run replaces
the records of the seeds it ran, and the summary is recomputed over the records of this machine's CPU;
records from other CPUs are kept apart, under `other_cpus`.
Writes benchmarks/results/time_to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import DATA, HERE, KERAS_PYTHON, SHARED, machine, run, save, train_run

THRESHOLDS = [0.60, 0.68, 0.80, 0.90, 0.93, 0.94]
RESULTS = HERE / "results" / "time_to_accuracy.json"


def reached(history: list[dict]) -> dict[str, float | None]:
    out, elapsed = {}, 0.0
    times = []
    for h in history:
        elapsed += h["seconds"]
        times.append((elapsed, h["val_acc"]))
    for t in THRESHOLDS:
        out[f"{t:.0%}"] = next((round(s, 1) for s, acc in times if acc >= t), None)
    return out


def summarize(records: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in records]
    return {"seeds": [r["seed"] for r in records], "test_accuracy_mean": round(statistics.mean(accs), 4),
            "test_accuracy_min": min(accs), "train_seconds_mean": round(statistics.mean(r["train_seconds"]
                                                                                      for r in records), 1),
            "peak_rss_mb_max": max((r["peak_rss_mb"] for r in records if r.get("peak_rss_mb")), default=None),
            "runs": records}


def previous_results() -> dict:
    try:
        return json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return {}


def split_by_cpu(old: dict, cpu: dict) -> tuple[dict[str, list], dict[str, list]]:
    """Earlier per-seed records: those of this CPU, and those of others (records from before CPUs were
    recorded came from the AMD EPYC (Zen 4, AVX-512 BF16) of sessions up to 2026-11-24)."""
    earlier = {"class": "avx512_bf16", "model": "AMD EPYC (Zen 4), before CPUs were recorded"}
    mine: dict[str, list] = {}
    others: dict[str, list] = {k: list(v) for k, v in old.get("other_cpus", {}).items()}
    for name, entry in old.get("recipes", {}).items():
        for r in entry.get("runs", []):
            r.setdefault("cpu", earlier)
            (mine if r["cpu"] == cpu else others).setdefault(name, []).append(r)
    return mine, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run the `fast` recipe (15-30 min a seed here)")
    parser.add_argument("--recipes", default=None, help="comma-separated presets (default: quick, or quick,fast)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per recipe (the mean is reported)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed, first-seed + 1, ...")
    parser.add_argument("--keras", action="store_true", help="time the tutorial's Keras code too")
    args = parser.parse_args()
    recipes = args.recipes.split(",") if args.recipes else ["quick"] + (["fast"] if args.full else [])
    now = machine()
    old = previous_results()
    # per-seed records of earlier runs (files from before per-seed records are not reused)
    cpu = {"class": now["cpu_class"], "model": now["cpu"]}
    records, others = split_by_cpu(old, cpu)
    result = {"machine": now, "data": "CIFAR-10 (JPEG copy)", "recipes": {}}
    if old.get("keras_15_epochs", {}).get("cpu") == cpu:
        result["keras_15_epochs"] = old["keras_15_epochs"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.keras:
            if not KERAS_PYTHON.exists():
                sys.exit("TensorFlow is not installed: run `make bench-keras` first")
            log = Path(tmp) / "keras.log"
            run([str(KERAS_PYTHON), str(SHARED / "bench" / "seed_keras.py"), "15", str(DATA)], log)
            keras = json.loads(next(ln for ln in reversed(log.read_text().splitlines()) if ln.startswith("{")))
            result["keras_15_epochs"] = {"train_seconds": keras["train_s"], "test_accuracy": keras["test_acc"],
                                         "date": now["date"], "cpu": cpu}
        for preset in recipes:
            fresh = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = train_run(preset, Path(tmp) / f"{preset}-{seed}", "--seed", str(seed))
                print(f"{preset} seed {seed}: {r['test_accuracy']:.4f} in {r['train_seconds']} s, "
                      f"peak RSS {r['peak_rss_mb']} MB", flush=True)
                fresh.append({"seed": seed, "test_accuracy": round(r["test_accuracy"], 4),
                              "train_seconds": r["train_seconds"], "peak_rss_mb": r["peak_rss_mb"],
                              "first_reached_s": reached(r["history"]), "date": now["date"], "cpu": cpu,
                              "matmul_gflops_now": now["matmul_gflops_now"]})
            ran = {r["seed"] for r in fresh}
            records[preset] = sorted([r for r in records.get(preset, []) if r["seed"] not in ran] + fresh,
                                     key=lambda r: r["seed"])
    for preset, recs in records.items():
        result["recipes"][preset] = summarize(recs)
    if others:
        result["other_cpus"] = others
    if "keras_15_epochs" in result and "quick" in recipes and args.keras:
        quick = result["recipes"]["quick"]["train_seconds_mean"]
        result["quick_fraction_of_keras_time"] = round(quick / result["keras_15_epochs"]["train_seconds"], 4)
    elif "quick_fraction_of_keras_time" in old and "keras_15_epochs" in result:
        result["quick_fraction_of_keras_time"] = old["quick_fraction_of_keras_time"]
    print(json.dumps(result, indent=2))
    save("time_to_accuracy", result)


if __name__ == "__main__":
    main()
