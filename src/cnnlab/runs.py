"""The run directory: what a training run leaves behind, and how to read it back.

    config.json         resolved configuration (preset, data, training)
    history.csv/.json   one record per epoch
    checkpoint.safetensors       last state for --resume (weights, optimizer, scheduler, RNG states, position),
    checkpoint.prev.safetensors  and the one before it, kept until the new one is complete
    model.safetensors   final weights
    model.json          what evaluation and prediction need besides the weights
    metrics.json, confusion_matrix.{csv,json,png}   written by evaluation

This module reads and lists run directories without PyTorch (`cnnlab runs` starts in a blink); the files
that hold tensors (checkpoints, weights) are written and read by checkpoints.py.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from . import files
from .errors import CnnlabError

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s", "val_seconds"]


def new_run_dir(root: str | Path, preset: str) -> Path:
    """`root/<timestamp>-<preset>`, made unique with a counter if two runs start in the same second."""
    base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CnnlabError(f"{path.parent} has no {path.name}; {what}") from None
    except (OSError, ValueError) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None


def read_config(run_dir: Path) -> dict:
    """A run's config.json, checked to be one: an object with "train" and "data" objects."""
    config = read_json(Path(run_dir) / "config.json", "is it a run directory?")
    if not (isinstance(config, dict) and all(isinstance(config.get(k), dict) for k in ("train", "data"))):
        raise CnnlabError(f"{Path(run_dir) / 'config.json'} is not a cnnlab run configuration (it needs \"train\" "
                          "and \"data\" objects); it was damaged or written by something else")
    return config


def recorded_accuracy(run_dir: Path) -> float | None:
    """The run's test accuracy from metrics.json, or None before it has been evaluated."""
    path = Path(run_dir) / "metrics.json"
    return read_json(path, "").get("test_accuracy") if path.is_file() else None


def write_history(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    files.write_text(run_dir / "history.csv", buf.getvalue())
    files.write_json(run_dir / "history.json", history)


def list_runs(root: str | Path) -> list[dict]:
    """One summary per run directory under `root` (those with a config.json), oldest first. A run whose files
    are damaged is listed as such, never fatal to the listing."""
    root = Path(root)
    if not root.is_dir():
        raise CnnlabError(f"runs folder {root} does not exist")
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        try:
            rows.append(_summary(d))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            rows.append({"name": d.name, "path": str(d), "preset": "(damaged)", "model": type(e).__name__,
                         "epochs": 0, "planned_epochs": None, "test_accuracy": None, "train_seconds": 0.0, "date": ""})
    return rows


def _summary(d: Path) -> dict:
    config = json.loads((d / "config.json").read_text())
    history = json.loads((d / "history.json").read_text()) if (d / "history.json").is_file() else []
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    return {"name": d.name, "path": str(d), "preset": str(config.get("preset", "")),
            "model": str(config.get("train", {}).get("model", "")), "epochs": len(history),
            "planned_epochs": config.get("train", {}).get("epochs"),
            "test_accuracy": float(metrics["test_accuracy"]) if metrics.get("test_accuracy") is not None else None,
            "train_seconds": round(sum(float(h["seconds"]) for h in history), 1),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime((d / "config.json").stat().st_mtime))}


def format_runs(rows: list[dict]) -> str:
    header = ["name", "preset", "model", "epochs", "test acc", "train s", "date"]
    table = [[r["name"], r["preset"], r["model"],
              f"{r['epochs']}/{r['planned_epochs']}" if r["planned_epochs"] else "-",
              "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2%}", f"{r['train_seconds']:.1f}",
              r["date"]] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)
