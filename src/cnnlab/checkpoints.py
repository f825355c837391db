"""Checkpoints and weights: the run directory's files that hold tensors.

Checkpoints are safetensors (no pickle, so loading runs no code) with the non-tensor structure as JSON in
their metadata and a SHA-256 over both, checked on load; the previous one is kept until a new one is
complete. The final weights are model.safetensors beside model.json, which says how to rebuild the network.

The final weights are committed in order: model.safetensors (with the SHA-256 of its tensors in its header),
then model.json, which records the same digest. model.json is the commit: a run that has it has complete
weights, and every reader (evaluate, predict, export, serve, report) checks them against the digest, so a
damaged file is an error instead of silently wrong predictions. A kill between the two files leaves a run
that `train --resume` completes from its final checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from . import files, models
from .device import precision_name
from .errors import CnnlabError
from .runs import read_json

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


def keep_rule(cfg, held_out: bool) -> str:
    """Which weights model.safetensors gets ("best" or "last"): `auto` keeps the best epoch's when validating on
    held-out images or stopping early."""
    if cfg.keep != "auto":
        return cfg.keep
    return "best" if cfg.early_stopping or held_out else "last"


def model_meta(cfg, ds, norm, model: nn.Module, dtype: torch.dtype, history: list[dict]) -> dict:
    """model.json: what predict, export and serve need to rebuild and feed the network as it was trained."""
    return {"model": cfg.model, "classes": ds.classes, "in_channels": ds.channels,
            "image_size": list(ds.image_size), "resize": ds.resize or "squish", "normalization": norm.to_dict(),
            "params": models.count_params(model), "precision": precision_name(dtype), "tta": cfg.tta,
            "epochs": cfg.epochs, "train_seconds": round(sum(h["seconds"] for h in history), 3),
            "pretrained": cfg.pretrained}


def save_model(run_dir: Path, model: nn.Module, meta: dict) -> None:
    """Final weights (safetensors) and the metadata that makes them usable on their own, committed in order."""
    weights = _cpu_weights(model)
    digest = _digest("", weights)
    files.write_bytes(run_dir / "model.safetensors", save(weights, metadata={"sha256": digest}))
    files.write_json(run_dir / "model.json", {**meta, "sha256": digest})


BEST = "best.safetensors"


def _cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as contiguous CPU tensors: what a weights file holds."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_best(run_dir: Path, model: nn.Module, epoch: int) -> None:
    """The best epoch's weights so far, beside the checkpoint (see TrainConfig.keep)."""
    weights = _cpu_weights(model)
    files.write_bytes(run_dir / BEST, save(weights, metadata={"sha256": _digest("", weights), "epoch": str(epoch)}))


def load_best(run_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """best.safetensors' weights, checked against their digest, and their epoch."""
    path = run_dir / BEST
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(path)
    except Exception as e:
        raise CnnlabError(f"cannot read {path}: {e}; the run's last weights are intact") from None
    if _digest("", weights) != meta.get("sha256"):
        raise CnnlabError(f"{path} is damaged (its checksum does not match)")
    return weights, int(meta["epoch"])


def load_weights(run_dir: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The final weights, checked against the digest model.json recorded (runs before it had none)."""
    path = run_dir / "model.safetensors"
    try:
        with open(path, "rb"):  # so that a mode-000 file is reported as such (safetensors calls it missing)
            pass
        weights = load_file(path)
    except FileNotFoundError:
        raise CnnlabError(f"{run_dir} has no weights (model.safetensors); is it a finished training run?") from None
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise CnnlabError(f"cannot read weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from None
    if "sha256" in meta and _digest("", weights) != meta["sha256"]:
        raise CnnlabError(f"{path} is damaged (its checksum does not match model.json); `cnnlab train --resume "
                          f"{run_dir}` writes it again from the run's final checkpoint")
    return weights


def _checked_meta(meta: Any, run_dir: Path) -> dict:
    """model.json as training writes it, checked before a network is built from it (a damaged or hand-edited
    file must be an error, not a 40,000 x 40,000 allocation nor a TypeError deep inside)."""
    if not (isinstance(meta, dict) and all(check(meta[key]) if key in meta else key in OPTIONAL
                                           for key, check in META_CHECKS.items())):
        raise CnnlabError(f"{run_dir / 'model.json'} is not what cnnlab training writes (model, classes, 1 or 3 "
                          "input channels, an image size of 1-4096 px per side, normalization); it was damaged or "
                          "edited")
    return meta


def _numbers(v: Any, low: float) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 3 and all(
        isinstance(x, int | float) and not isinstance(x, bool) and low <= x < 1e6 for x in v)


OPTIONAL = ("resize", "precision", "tta", "sha256")  # runs of older versions did not write them
META_CHECKS = {  # what each field of model.json must hold
    "model": lambda v: isinstance(v, str),
    "in_channels": lambda v: v in (1, 3) and not isinstance(v, bool),
    "classes": lambda v: isinstance(v, list) and 1 <= len(v) <= 100_000 and all(isinstance(c, str) for c in v),
    "image_size": lambda v: isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 4096 for x in v),
    "normalization": lambda v: isinstance(v, dict) and _numbers(v.get("mean"), -1e6) and _numbers(v.get("std"), 1e-12),
    "resize": lambda v: v in ("crop", "pad", "squish"),
    "precision": lambda v: v in ("fp32", "bf16", "fp16"),
    "tta": lambda v: v in (0, 1, 2) and not isinstance(v, bool),
    "sha256": lambda v: isinstance(v, str),
}


def model_complete(run_dir: Path) -> bool:
    """Whether the run has committed final weights that pass their checksum."""
    try:
        meta = _checked_meta(read_json(run_dir / "model.json", "it is not a complete training run"), run_dir)
        load_weights(run_dir, meta)
    except CnnlabError:  # --resume writes both again from the final checkpoint
        return False
    return True


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained network (in eval mode) and its metadata from a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CnnlabError(f"run directory {run_dir} does not exist")
    if not (run_dir / "model.safetensors").is_file():
        raise CnnlabError(f"{run_dir} has no weights (model.safetensors); is it a finished training run?")
    meta = _checked_meta(read_json(run_dir / "model.json", "it is not a complete training run"), run_dir)
    weights = load_weights(run_dir, meta)
    model = models.build(meta["model"], meta["in_channels"], len(meta["classes"]), tuple(meta["image_size"]))
    try:
        model.load_state_dict(weights)
    except Exception as e:
        raise CnnlabError(f"cannot load weights {run_dir / 'model.safetensors'}: {e}") from None
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
    weights = load_weights(source, meta)
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
