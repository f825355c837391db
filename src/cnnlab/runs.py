"""The run directory: what a training run leaves behind, and how to read it back.

    config.json         resolved configuration (preset, data, training)
    history.csv/.json   one record per epoch
    checkpoint.pt       last state for --resume (weights, optimizer, scheduler, RNG states, position)
    model.safetensors   final weights
    model.json          what evaluation and prediction need besides the weights
    metrics.json, confusion_matrix.{csv,json,png}   written by evaluation
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from . import files, models
from .errors import CnnlabError

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s"]


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


def write_history(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    files.write_text(run_dir / "history.csv", buf.getvalue())
    files.write_json(run_dir / "history.json", history)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    with files.atomic_path(run_dir / "checkpoint.pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise CnnlabError(f"{run_dir} has no checkpoint.pt to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CnnlabError(f"cannot read checkpoint {path}: {e}") from None


def save_model(run_dir: Path, model: nn.Module, meta: dict) -> None:
    """Final weights (safetensors) and the metadata that makes them usable on their own."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    files.write_bytes(run_dir / "model.safetensors", save(weights))
    files.write_json(run_dir / "model.json", meta)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained network (in eval mode) and its metadata from a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CnnlabError(f"run directory {run_dir} does not exist")
    weights_path = run_dir / "model.safetensors"
    if not weights_path.is_file():
        raise CnnlabError(f"{run_dir} has no weights (model.safetensors); is it a finished training run?")
    meta = read_json(run_dir / "model.json", "it is not a complete training run")
    model = models.build(meta["model"], meta["in_channels"], len(meta["classes"]), tuple(meta["image_size"]))
    try:
        model.load_state_dict(load_file(weights_path))
    except Exception as e:
        raise CnnlabError(f"cannot load weights {weights_path}: {e}") from None
    return model.to(device).eval(), meta
