"""How the run's tensor files are made: safetensors (no pickle, so loading runs no code) with a SHA-256 over
their tensors, and for checkpoints the non-tensor structure as JSON in the metadata, covered by the digest.

The file names and which file holds what are the business of `Run` (run/__init__.py); this module knows only
the format. PyTorch and safetensors are imported by the functions that need them, so that reading a run's
JSON files (`cnnlab runs`, an ONNX prediction) never imports them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHECKPOINT_FORMAT = "cnnlab-checkpoint-1"


def _flatten(obj: Any, tensors: dict) -> Any:
    """JSON for `obj` with each tensor replaced by a reference into `tensors` (types kept exactly)."""
    import torch

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


def _unflatten(obj: Any, tensors: dict) -> Any:
    import torch

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


def digest(skeleton: str, tensors: dict) -> str:
    """SHA-256 over a JSON skeleton and every tensor's name, type, shape and bytes."""
    import torch

    h = hashlib.sha256(skeleton.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_bytes(state: dict) -> bytes:
    """A training state (nested dicts, lists and tensors) as one safetensors file."""
    from safetensors.torch import save

    tensors: dict = {}
    skeleton = json.dumps(_flatten(state, tensors))
    return save(tensors, metadata={"format": CHECKPOINT_FORMAT, "state": skeleton, "sha256": digest(skeleton, tensors)})


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state; ValueError (with the reason) when it is unreadable, foreign or damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ValueError(f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or "state" not in meta:
        raise ValueError("not a cnnlab checkpoint")
    if digest(meta["state"], tensors) != meta.get("sha256"):
        raise ValueError("checksum mismatch: the file was damaged after it was written")
    return _unflatten(json.loads(meta["state"]), tensors)


def weights_bytes(weights: dict, **metadata: str) -> tuple[bytes, str]:
    """Weights (a state dict of CPU tensors) as a safetensors file carrying its digest, and the digest."""
    from safetensors.torch import save

    sha = digest("", weights)
    return save(weights, metadata={"sha256": sha, **metadata}), sha


def read_weights(path: Path) -> tuple[dict, dict]:
    """A weights file's tensors and metadata. Errors are the reader's own (the caller words them)."""
    from safetensors import safe_open

    with open(path, "rb"):  # so that a mode-000 file is reported as such (safetensors calls it missing)
        pass
    with safe_open(str(path), "pt") as f:  # one open for the header and the tensors, as read_checkpoint does
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
