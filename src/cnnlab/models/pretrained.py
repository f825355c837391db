"""The weights a run starts from (`--pretrained imagenet|PATH`), and what comes with them.

`imagenet` is torchvision's published weight file for the network (backbones.py has the same keys), fetched
once into PyTorch's hub cache (`torch.hub.get_dir()/checkpoints`, as torchvision itself does) with a progress
bar and its SHA-256 checked against the prefix in its name. Without internet that fails in one line naming
the URL and the path to place the file at. $CNNLAB_WEIGHTS_MIRROR replaces torchvision's address with a
mirror's (an internal server, or a folder as file:///...), keeping the file names.

A PATH is a `.pth`/`.pt` file (read with `weights_only=True`: no code runs) or a `.safetensors` file, holding
a state_dict, possibly under "state_dict" or "model" and with DDP's "module." prefix.

Either way the classifier head is replaced when its class count differs, a first convolution is adapted to
another channel count (summed over RGB for grey images), and the run records the normalization and input
size the weights expect, so that predict, export and serve preprocess as the weights were trained.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab import files
from cnnlab.errors import CnnlabError
from cnnlab.run import Run

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, on the [0, 1] scale
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_URL = "https://download.pytorch.org/models/"
SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class Weights:
    file: str  # the file name at TORCHVISION_URL; the 8 hex digits before the suffix begin its SHA-256
    size: int  # the input size the weights were evaluated at (torchvision's crop size)
    top1: float  # ImageNet-1k top-1 accuracy, as torchvision publishes it
    version: str  # torchvision's name for these weights ("DEFAULT" is the newest of each network)

    @property
    def url(self) -> str:
        return os.environ.get("CNNLAB_WEIGHTS_MIRROR", TORCHVISION_URL).rstrip("/") + "/" + self.file

    @property
    def hash_prefix(self) -> str:
        return self.file.rsplit("-", 1)[1].split(".")[0]


# torchvision 0.29's DEFAULT weights of each backbone (its IMAGENET1K_V2 where that is newer)
IMAGENET = {
    "resnet18_imagenet": Weights("resnet18-f37072fd.pth", 224, 69.758, "IMAGENET1K_V1"),
    "resnet50": Weights("resnet50-11ad3fa6.pth", 224, 80.858, "IMAGENET1K_V2"),
    "mobilenet_v3_large": Weights("mobilenet_v3_large-5c1a4163.pth", 224, 75.274, "IMAGENET1K_V2"),
    "efficientnet_b0": Weights("efficientnet_b0_rwightman-7f5810bc.pth", 224, 77.692, "IMAGENET1K_V1"),
    "convnext_tiny": Weights("convnext_tiny-983f1562.pth", 224, 82.52, "IMAGENET1K_V1"),
}


def check(model: str, source: str | None) -> None:
    """Before any data is read: `imagenet` for a network that has such weights, or a weights file that exists."""
    if source is None:
        return
    if source == "imagenet":
        if model not in IMAGENET:
            hint = " (resnet18 is the CIFAR variant; torchvision's is resnet18_imagenet)" if model == "resnet18" else ""
            raise CnnlabError(f"--pretrained imagenet: {model!r} has no ImageNet weights{hint}; networks that have "
                              f"them: {', '.join(IMAGENET)}")
        return
    path = source_path(model, source)
    if not path.is_file():
        raise CnnlabError(f"--pretrained {source}: no such file (give `imagenet`, a .pth, .pt or .safetensors file, "
                          "or a finished cnnlab run)")
    if path.suffix not in SUFFIXES:
        raise CnnlabError(f"--pretrained {source}: a weights file ends in .pth, .pt or .safetensors")


def cached_path(weights: Weights) -> Path:
    """Where torchvision keeps the file too: a file fetched by either serves both."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.file


def downloadable(model: str, timeout: float = 3.0) -> bool:
    """Whether `model`'s ImageNet weights can be fetched from here now: its URL answers a HEAD request within
    `timeout` seconds (for a file:// mirror, the file is there). Offline this is a refused connection or a
    failed name lookup, not a wait."""
    url = IMAGENET[model].url
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).is_file()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def fetch(model: str) -> Path:
    """The ImageNet weight file of `model`, downloaded first when it is not in the hub cache."""
    weights = IMAGENET[model]
    path = cached_path(weights)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.exclusive(path.with_name(f".{path.name}.lock")):  # the processes of a machine: one download
            if path.is_file():  # another process fetched it while this one waited
                return path
            log.info(f"downloading {weights.url} to {path}")
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=weights.hash_prefix, progress=True)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e.strerror or e
        raise CnnlabError(f"cannot download {weights.url} ({reason}); on a machine with internet, fetch that file "
                          f"and place it at {path}") from None
    except RuntimeError as e:  # torch.hub: "invalid hash value" (the partial file is already removed)
        raise CnnlabError(f"{weights.url} arrived damaged ({e}); nothing was kept at {path}: try again") from None
    return path


def read(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a weights file, never running code from it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # pickle, zip and safetensors each fail in their own words
        raise CnnlabError(f"cannot read weights from {path}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model"):  # training checkpoints of other tools
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CnnlabError(f"{path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def source_path(model: str, source: str) -> Path:
    """The weights file: ImageNet's (fetched once), a file, or a finished cnnlab run's model.safetensors."""
    if source == "imagenet":
        return fetch(model)
    path = Path(source).expanduser()
    return path / Run.WEIGHTS if Run.is_finished(path) else path


def run_meta(source: str | None) -> dict | None:
    """The model.json of the cnnlab run that a --pretrained file comes from (its input size, normalization and
    channels), or None for ImageNet's weights and files of other tools."""
    if not source or source == "imagenet":
        return None
    import json

    path = Path(source).expanduser()
    meta_file = (path if path.is_dir() else path.parent) / Run.META
    if path.is_file() and path.name not in (Run.WEIGHTS, Run.BEST) or not meta_file.is_file():
        return None  # (a run's best weights were trained as its final ones were)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "image_size" in meta and "normalization" in meta else None


def load_into(model: nn.Module, name: str, head: str, source: str) -> str:
    """Copy the weights of `source` into `model`; return what was done, in words.

    `head` names the classifier (its weight and bias are left fresh when their shape differs); a first
    convolution made for another channel count is adapted; any other difference is an error naming it.
    """
    path = source_path(name, source)
    own = model.state_dict()
    state, notes = fitted(read(path), own, head, source)
    model.load_state_dict(state, strict=False)
    kept = sum(k in state for k in own)
    return f"pretrained weights from {path}: {kept} of {len(own)} tensors copied" + "".join(f"; {n}" for n in notes)


def fitted(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], head: str, source: str,
           shapes: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's state_dict made to fit `own` (head left out when its shape differs, first convolution
    adapted), and what was changed; a CnnlabError naming the first tensor that cannot fit. Without `shapes`,
    only the names are compared (a network whose shapes follow an input size not yet known)."""
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]  # a file without a head: fine
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = (f"{missing[0]!r} is missing" if missing else f"{unexpected[0]!r} is not in this network")
        raise CnnlabError(f"--pretrained {source}: the file does not fit this network ({len(missing)} keys missing, "
                          f"{len(unexpected)} unknown; {first}): was it saved from the same architecture?")
    notes = []
    for key in list(state) if shapes else []:
        if state[key].shape == own[key].shape:
            continue
        if key.startswith(head + "."):
            del state[key]
        elif _first_conv(own) == key and state[key].shape[0] == own[key].shape[0]:
            notes.append(f"first convolution adapted from {state[key].shape[1]} to {own[key].shape[1]} channels")
            state[key] = _adapt_channels(state[key], own[key].shape[1])
        else:
            raise CnnlabError(f"--pretrained {source}: {key} has shape {tuple(state[key].shape)} in the file and "
                              f"{tuple(own[key].shape)} in this network")
    if f"{head}.weight" not in state:
        notes.append(f"a new {own[head + '.weight'].shape[0]}-class head ({head})")
    return state, notes


def _first_conv(own: dict[str, torch.Tensor]) -> str | None:
    return next((k for k, v in own.items() if v.ndim == 4), None)


def _adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB filters for another channel count: summed for one channel (a grey image is R = G = B), else the
    RGB filters repeated and rescaled so that the response to a uniform input keeps its size."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    repeated = weight.repeat(1, -(-channels // weight.shape[1]), 1, 1)[:, :channels]
    return repeated * (weight.shape[1] / channels)
