"""The run directory: what a training run leaves behind, and how to read it back.

    config.json         resolved configuration (preset, data, training)
    history.csv/.json   one record per epoch
    checkpoint.safetensors       last state for --resume (weights, optimizer, scheduler, RNG states, position),
    checkpoint.prev.safetensors  and the one before it, kept until the new one is complete
    model.safetensors   final weights
    model.json          what evaluation and prediction need besides the weights
    metrics.json, confusion_matrix.{csv,json,png}   written by evaluation
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from . import files, models
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


# ---------------------------------------------------------------------------------------------------
# Checkpoints: safetensors (no pickle, so loading runs no code) with the non-tensor structure as JSON in
# its metadata, and a SHA-256 over both, checked on load.

CHECKPOINT, PREVIOUS = "checkpoint.safetensors", "checkpoint.prev.safetensors"
CHECKPOINT_FORMAT = "cnnlab-checkpoint-1"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `obj` with each tensor replaced by a reference into `tensors` (types kept exactly)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        if obj.is_contiguous():
            return {"__tensor__": key}
        # Optimizer moments of channels-last weights are channels-last too, and fused optimizers walk
        # weights and moments as flat memory: the layout must come back exactly as it was.
        return {"__tensor__": key, "stride": list(obj.stride())}
    if isinstance(obj, dict):  # optimizer states have int keys, which JSON objects cannot
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = tensors[obj["__tensor__"]]
            if "stride" in obj:
                t = torch.empty_strided(t.shape, obj["stride"], dtype=t.dtype).copy_(t)
            return t
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _digest(skeleton: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(skeleton.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write the checkpoint atomically; the previous one becomes checkpoint.prev.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_flatten(state, tensors))
    meta = {"format": CHECKPOINT_FORMAT, "state": skeleton, "sha256": _digest(skeleton, tensors)}
    blob = save(tensors, metadata=meta)
    with files.atomic_path(run_dir / CHECKPOINT, backup=run_dir / PREVIOUS) as tmp:
        tmp.write_bytes(blob)


def _read_checkpoint(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ValueError(f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or "state" not in meta:
        raise ValueError("not a cnnlab checkpoint")
    if _digest(meta["state"], tensors) != meta.get("sha256"):
        raise ValueError("checksum mismatch: the file was damaged after it was written")
    return _unflatten(json.loads(meta["state"]), tensors)


def load_checkpoint(run_dir: Path, log=print) -> dict | None:
    """The newest intact checkpoint, or None if the run never wrote one.

    A damaged latest checkpoint falls back to the previous one, and says so.
    """
    problems = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            state = _read_checkpoint(path)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if problems:
            log(f"warning: {problems[0]}; resuming from the previous checkpoint "
                f"(epoch {state['epoch'] + 1}, step {state['step']})")
        return state
    if (run_dir / "checkpoint.pt").is_file():  # written by cnnlab 0.1
        try:
            return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            problems.append(f"checkpoint.pt: {e}")
    if problems:
        raise CnnlabError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}")
    return None


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


def init_from(model: nn.Module, model_name: str, source: str | Path) -> str:
    """Start `model` from a finished run's weights (fine-tuning); say what was taken.

    The architecture must be the same. When the class count differs, the classifier (the last linear
    layer) keeps its fresh initialization and everything before it is copied.
    """
    source = Path(source)
    meta = read_json(source / "model.json", "--init-from needs a finished training run")
    if meta["model"] != model_name:
        raise CnnlabError(f"--init-from {source}: that run trained {meta['model']!r}, this one is {model_name!r}; "
                          "fine-tuning needs the same architecture (pass --model)")
    try:
        weights = load_file(source / "model.safetensors")
    except Exception as e:
        raise CnnlabError(f"cannot load weights {source / 'model.safetensors'}: {e}") from None
    own = model.state_dict()
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    differ = sorted(k for k in own if k in weights and weights[k].shape != own[k].shape)
    unfit = [k for k in differ if not head or not k.startswith(head[0] + ".")]
    unfit += sorted(set(own) ^ set(weights))
    if unfit:
        raise CnnlabError(f"--init-from {source}: its weights do not fit this model ({unfit[0]} differs, e.g. "
                          f"another input channel count or image size: it was trained on {meta['in_channels']} "
                          f"channels at {meta['image_size']})")
    model.load_state_dict({k: v for k, v in weights.items() if k not in differ}, strict=False)
    if differ:
        return (f"initialized from {source}; new classifier head ({len(meta['classes'])} -> "
                f"{own[head[0] + '.weight'].shape[0]} classes), all other layers copied")
    return f"initialized from {source}: all {len(own)} tensors copied"


def list_runs(root: str | Path) -> list[dict]:
    """One summary per run directory under `root` (those with a config.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise CnnlabError(f"runs folder {root} does not exist")
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        try:
            config = json.loads((d / "config.json").read_text())
            history = json.loads((d / "history.json").read_text()) if (d / "history.json").is_file() else []
            metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
        except (OSError, ValueError):
            continue  # a damaged run is skipped, not fatal to the listing
        rows.append({"name": d.name, "path": str(d), "preset": config.get("preset", ""),
                     "model": config.get("train", {}).get("model", ""), "epochs": len(history),
                     "planned_epochs": config.get("train", {}).get("epochs"),
                     "test_accuracy": metrics.get("test_accuracy"),
                     "train_seconds": round(sum(h["seconds"] for h in history), 1),
                     "date": time.strftime("%Y-%m-%d %H:%M", time.localtime((d / "config.json").stat().st_mtime))})
    return rows


def format_runs(rows: list[dict]) -> str:
    header = ["name", "preset", "model", "epochs", "test acc", "train s", "date"]
    table = [[r["name"], r["preset"], r["model"], f"{r['epochs']}/{r['planned_epochs']}",
              "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2%}", f"{r['train_seconds']:.1f}",
              r["date"]] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)
