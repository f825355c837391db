"""Helpers shared by the benchmark scripts: where things are, running a command, saving results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from cnnlab import files
from cnnlab.doctor import matmul_gflops, training_step  # noqa: F401  (training_step: for the benchmarks)
from cnnlab.hardware import cpu_class, cpu_model  # noqa: F401  (cpu_class: for the benchmarks)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "cifar10-jpeg"
CNNLAB = [sys.executable, "-m", "cnnlab.cli"]
KERAS_PYTHON = ROOT / ".venv-keras" / "bin" / "python"


def machine() -> dict:
    """The machine, and how fast its shared cores ran when the benchmark was taken.

    On this shared host the bf16 matrix-product rate has been seen anywhere from 410 to 950 GFLOP/s on
    different hours while fp32 moved far less, so bf16-against-fp32 ratios (cnnlab against Keras) move
    with it; the probe is recorded next to every result.
    """
    probe = {name: round(matmul_gflops(dtype, torch.device("cpu")), 1) for name, dtype in (("fp32", torch.float32),
                                                                                        ("bf16", torch.bfloat16))}
    return {"cpu": cpu_model(), "cpu_class": cpu_class(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "matmul_gflops_now": probe}


def run(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Run a command with its output going to `log`; return (wall seconds, exit code, peak RSS in MB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, proc.returncode, usage.ru_maxrss // 1024


def train_run(preset: str, out: Path, *extra: str) -> dict:
    """Train a preset through the CLI; return its history, metrics and peak memory."""
    seconds, code, rss = run([*CNNLAB, "train", "--data", str(DATA), "--preset", preset, "--out", str(out), *extra],
                             out.with_suffix(".log"))
    if code != 0:
        sys.exit(f"cnnlab train --preset {preset} failed (exit {code}); see {out.with_suffix('.log')}")
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {"history": history, "test_accuracy": metrics["test_accuracy"],
            "train_seconds": round(sum(h["seconds"] for h in history), 1), "wall_seconds": round(seconds, 1),
            "peak_rss_mb": rss}


def save(name: str, result: dict) -> Path:
    path = HERE / "results" / f"{name}.json"
    files.write_json(path, result)
    print(f"wrote {path}")
    return path
