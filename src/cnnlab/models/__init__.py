"""The models layer: networks by name, their weights, and a Keras-style `summary` table.

    _registry     names -> factories; imports nothing of the project but its error type (as timm's does)
    networks      cnnlab's own: the tutorial's `seed` CNN, airbench's networks
    zoo           the standard CIFAR architectures (ResNets, VGG, Wide ResNet, MobileNetV2, photonet)
    backbones     ImageNet backbones whose weights load from torchvision's files
    spec          layer-spec strings such as "c32-p-c64-p-f-d128"
    pretrained    where ImageNet (or a run's) weights come from, checked and cached

Add a model with `@register("name")` on a function `(in_channels, num_classes, image_size) -> nn.Module`;
from then on `train`, `cnnlab summary` and every other API take that name. This layer imports only the base
modules (errors, files, device): a network never knows what data or loop trains it. The functions below
are its API.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models import spec
from cnnlab.models._registry import MODELS, Builder, register  # noqa: F401  (this package's API)
from cnnlab.run import Run


def check(name: str) -> None:
    """Fail early, before any data is read, on an unknown name or a spec that does not parse."""
    if spec.looks_like_spec(name):
        spec.check_syntax(name)
    elif name not in MODELS:
        raise CnnlabError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}, "
                          "or write a layer spec such as c32-p-c64-p-f-d128")


def build(name: str, in_channels: int = 3, num_classes: int = 10, image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    """A fresh network: a registered name (`cnnlab models`) or a layer spec such as `c32-p-c64-p-f-d128`."""
    if name in MODELS:
        model = MODELS[name](in_channels, num_classes, tuple(image_size))
        if not isinstance(model, nn.Module):
            raise CnnlabError(f"the factory registered as {name!r} returned {type(model).__name__}, not a Module")
        return model
    if spec.looks_like_spec(name):
        return spec.build(name, in_channels, num_classes, tuple(image_size))
    check(name)


def check_size(name: str, in_channels: int, image_size: tuple[int, int]) -> None:
    """Build `name` without storage (PyTorch's meta device): a size the network cannot take, or one that would
    make it absurdly large, fails here, before any data is decoded at that size."""
    with torch.device("meta"):
        build(name, in_channels, 10, image_size)


def size_warning(model: nn.Module, image_size: tuple[int, int]) -> str | None:
    """A warning when one dense layer after a Flatten holds most of a large network: its weights grow with
    the image area (the tutorial's net has 0.5 M parameters at 32x32 and 41 M at 274x297)."""
    dense = max((m for m in model.modules() if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel(),
                default=None)
    total = count_params(model, trainable_only=False)
    if dense is None or dense.weight.numel() < 2_000_000 or dense.weight.numel() < total / 2:
        return None
    h, w = image_size
    return (f"warning: the network has {total / 1e6:.1f} M parameters at {h}x{w}, {dense.weight.numel() / 1e6:.1f} M "
            "of them in one dense layer after a flatten, whose size grows with the image area. Pass a smaller "
            "--image-size (e.g. 32), or use a network with global pooling (photonet, resnet20, or `g` in a layer spec)")


def load_model(run: Run | str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A finished run's network (in eval mode, its weights checked) and its metadata (model.json)."""
    run = Run.of(run)
    if not run.path.is_dir():
        raise CnnlabError(f"run directory {run} does not exist")
    if not run.file(Run.WEIGHTS).is_file():
        raise CnnlabError(f"{run} has no weights ({Run.WEIGHTS}); is it a finished training run?")
    meta = run.meta()
    weights = run.weights(meta)
    model = build(meta["model"], meta["in_channels"], len(meta["classes"]), tuple(meta["image_size"]))
    try:
        model.load_state_dict(weights)
    except Exception as e:
        raise CnnlabError(f"cannot load weights {run.file(Run.WEIGHTS)}: {e}") from None
    return model.to(device).eval(), meta


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def summary(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The tutorial's `model.summary()`: one row per layer with output shape and parameter count."""
    rows: list[tuple[str, str, int]] = []
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]

    def hook(name: str):
        def record(mod: nn.Module, _inp, out: torch.Tensor) -> None:
            shape = "(None, " + ", ".join(str(d) for d in out.shape[1:]) + ")"
            params = sum(p.numel() for p in mod.parameters(recurse=False))
            rows.append((f"{name} ({type(mod).__name__})", shape, params))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total = count_params(model, trainable_only=False)
    trainable = count_params(model)
    w1 = max(len("Layer (type)"), *(len(r[0]) for r in rows)) + 2
    w2 = max(len("Output Shape"), *(len(r[1]) for r in rows)) + 2
    rule = "=" * (w1 + w2 + 12)
    lines = [f"{'Layer (type)':<{w1}}{'Output Shape':<{w2}}{'Param #':>12}", rule]
    lines += [f"{a:<{w1}}{b:<{w2}}{c:>12,}" for a, b, c in rows]
    lines += [rule, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# An airbench94-shaped network (Keller Jordan's CIFAR-10 speed records), written for this project from
# the published method: a frozen-statistics whitening conv, three conv groups with BatchNorm and GELU,
# max-pooling down to one pixel, and a scaled linear head.


# the families register their networks on import
from cnnlab.models import backbones, networks, zoo  # noqa: E402,F401
from cnnlab.models.networks import AirNet, ConvGroup, Whiten, keras_init, seed_cnn  # noqa: E402,F401
