"""Time budgets: `cnnlab train --budget B` on CIFAR-10, its accuracy and its actual time against the budget.

    .venv/bin/python benchmarks/budget.py                 # budgets of 1, 3 and 10 minutes
    .venv/bin/python benchmarks/budget.py --curves        # the accuracy-per-epoch table budget.py plans with

`--curves` trains `quick` and `fast` for 1, 2, 4 and 8 epochs and prints each test accuracy: the numbers of
`cnnlab.budget.ACCURACY`. The default runs each budget as a user would and reports the recipe and epochs it
chose, the expected and the measured accuracy, the training seconds (training and per-epoch validation,
which the budget covers) and the whole command's wall clock (which adds start-up and the final evaluation).
Writes benchmarks/results/budget.json (or budget-curves.json) with the CPU class.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import CNNLAB, DATA, ROOT, machine, save


def train(out: Path, *flags: str) -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*CNNLAB, "train", "--data", str(DATA), "--no-report", "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {"test_accuracy": round(100 * metrics["test_accuracy"], 2), "epochs": len(history),
            "train_and_validation_s": round(sum(h["seconds"] + h.get("val_seconds", 0) for h in history), 1),
            "wall_s": round(wall, 1)}, proc.stdout, wall


def curves(tmp: Path) -> dict:
    table = {}
    for preset in ("quick", "fast"):
        for epochs in (1, 2, 4, 8):
            r, _, _ = train(tmp / f"{preset}-{epochs}", "--preset", preset, "--epochs", str(epochs))
            table.setdefault(preset, {})[epochs] = r
            print(f"{preset} {epochs} epochs: {r['test_accuracy']}% in {r['train_and_validation_s']} s", flush=True)
    return table


def budgets(tmp: Path, minutes: list[float]) -> dict:
    out = {}
    for m in minutes:
        r, log, _ = train(tmp / f"budget-{m}", "--budget", f"{m}m")
        chosen = re.search(r"budget plan: (\S+) for (\d+) epochs? of ~([\d.]+) s \(expected ([\d.]+)%", log)
        r.update(budget_s=m * 60, preset=chosen.group(1), planned_epochs=int(chosen.group(2)),
                 expected_accuracy=float(chosen.group(4)))
        out[f"{m}m"] = r
        print(f"budget {m} min: {r['preset']} x {r['planned_epochs']} -> {r['test_accuracy']}% (expected "
              f"{r['expected_accuracy']}%); training {r['train_and_validation_s']} s of {m * 60:.0f}, whole command "
              f"{r['wall_s']} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curves", action="store_true", help="measure the accuracy-per-epoch table instead")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 3, 10])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.curves:
            save("budget-curves", {"machine": machine(), "curves": curves(Path(tmp))})
        else:
            save("budget", {"machine": machine(), "budgets": budgets(Path(tmp), args.minutes)})


if __name__ == "__main__":
    main()
