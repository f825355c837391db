"""The wall clock of whole commands, from pressing Enter to the answer, and where it goes.

    .venv/bin/python benchmarks/time_to_result.py [--skip-fast] [--isa native|avx2]

For `quick` (with and without the report), `seed` for 1 epoch and `fast` for 1 epoch: the whole command,
the training seconds, and the overheads read from the run directory's file times: start-up and data load
(to config.json), validation (history's val_seconds), the rest of `fit` (model build, whitening init,
checkpoints), the final evaluation (model.safetensors to metrics.json), the report, and the exit. Then
`export`, `predict` of one image (through PyTorch, and through the run's own export once it has one) beside
`import torch` alone, and `data info` on the cached data. Run after the decoded-data cache
exists (the script makes sure it does). Writes benchmarks/results/time_to_result.json with the CPU class.

Targets (issue "time to result"): quick at most 1.3x its training seconds with --no-report and 1.5x with
the report; predict of one image and data info under 2 s; export under 8 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import CNNLAB, DATA, ROOT, machine, save

ENV: dict[str, str] = dict(os.environ)  # --isa avx2 adds the variables that cap the kernels at AVX2


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=ENV)
    return time.perf_counter() - t0


def train(out: Path, *flags: str) -> dict:
    t0 = time.time()
    timed([*CNNLAB, "train", "--data", str(DATA), "--out", str(out), *flags])
    end = time.time()
    mtime = {p.name: p.stat().st_mtime for p in out.iterdir()}
    history = json.loads((out / "history.json").read_text())
    train_s = sum(h["seconds"] for h in history)
    val_s = sum(h.get("val_seconds", 0.0) for h in history)
    in_fit = mtime["model.safetensors"] - mtime["config.json"]
    last = mtime.get("report.html", mtime["metrics.json"])
    parts = {"wall": end - t0, "training": train_s, "startup_and_data_load": mtime["config.json"] - t0,
             "validation": val_s, "init_and_checkpoints": in_fit - train_s - val_s,
             "final_evaluation": mtime["metrics.json"] - mtime["model.safetensors"],
             "report": mtime["report.html"] - mtime["metrics.json"] if "report.html" in mtime else 0.0,
             "exit": end - last}
    parts = {k: round(v, 2) for k, v in parts.items()}
    parts["wall_over_training"] = round(parts["wall"] / parts["training"], 2)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-fast", action="store_true", help="leave out fast's epoch (over a minute)")
    parser.add_argument("--predict-only", action="store_true",
                        help="train quick alone, then time predict, import torch and export")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: PyTorch's kernels and oneDNN capped at AVX2, fp32 (an AVX2 laptop's path)")
    args = parser.parse_args()
    extra = []
    if args.isa == "avx2":
        ENV.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
        extra = ["--precision", "fp32"]
    timed([*CNNLAB, "data", "info", "--data", str(DATA)])  # builds the decoded-data cache if it is missing
    result: dict = {"machine": machine(), "isa": args.isa, "commands": {}}
    runs = [("quick --no-report", ["--preset", "quick", "--no-report"]), ("quick", ["--preset", "quick"]),
            ("seed, 1 epoch, --no-report", ["--preset", "seed", "--epochs", "1", "--no-report"])]
    if args.predict_only:
        runs = runs[:1]
    elif not args.skip_fast:
        runs.append(("fast, 1 epoch, --no-report", ["--preset", "fast", "--epochs", "1", "--no-report"]))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags) in enumerate(runs):
            result["commands"][f"train {name}"] = train(Path(tmp) / f"run{i}", *flags, *extra)
            print(f"train {name}: {result['commands'][f'train {name}']}", flush=True)
        result["commands"].update(after_training(Path(tmp) / "run0", args.predict_only))
    result["targets"] = {"quick --no-report wall/training": 1.3, "quick wall/training": 1.5,
                         "predict one image s": 2.0, "data info s": 2.0, "export s": 8.0}
    save("time_to_result" + ("-avx2" if args.isa == "avx2" else "") + ("-predict" if args.predict_only else ""),
         result)


def after_training(run: Path, predict_only: bool) -> dict:
    """Predicting one image from the run directory (through PyTorch, then through the run's own export, which
    `predict` takes when it is current), `import torch` alone for comparison, export and data info. Each
    predict and import is timed three times, interleaved, and the median kept."""
    image = str(next((DATA / "test" / "cat").iterdir()))
    predict = [*CNNLAB, "predict", str(run), image]
    commands: dict = {}

    def rounds(named: dict[str, list[str]]) -> None:
        times: dict[str, list[float]] = {name: [] for name in named}
        for _ in range(3):
            for name, cmd in named.items():
                times[name].append(timed(cmd))
        for name, ts in times.items():
            commands[name] = {"wall": round(sorted(ts)[1], 2), "rounds": [round(t, 2) for t in ts]}
            print(f"{name}: {commands[name]['wall']} s (median of {commands[name]['rounds']})", flush=True)

    rounds({"predict one image": predict, "import torch": [CNNLAB[0], "-c", "import torch"]})
    later = [("export", ["export", str(run)])] + ([] if predict_only else [("data info", ["data", "info", "--data",
                                                                                         str(DATA)])])
    for name, cmd in later:
        commands[name] = {"wall": round(timed([*CNNLAB, *cmd]), 2)}
        print(f"{name}: {commands[name]['wall']} s", flush=True)
    rounds({"predict one image, the run exported": predict})
    return commands


if __name__ == "__main__":
    main()
