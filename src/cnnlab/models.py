"""Networks by name, and a Keras-style `summary` table.

Add a model with `@register("name")` on a function `(in_channels, num_classes, image_size) -> nn.Module`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .errors import CnnlabError

Builder = Callable[[int, int, tuple[int, int]], nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        MODELS[name] = fn
        return fn
    return wrap


def build(name: str, in_channels: int = 3, num_classes: int = 10, image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    if name not in MODELS:
        raise CnnlabError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels, num_classes, tuple(image_size))


def keras_init(model: nn.Module) -> nn.Module:
    """Keras' defaults: Glorot-uniform weights, zero biases (PyTorch's own defaults train differently)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@register("seed")
def seed_cnn(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """The tutorial's network: two conv-ReLU-maxpool blocks, Dense 128 ReLU, Dense classes.

    545,098 parameters for 32x32x3 inputs and 10 classes. The softmax lives in the loss.
    """
    h, w = image_size[0] // 4, image_size[1] // 4
    if h < 1 or w < 1:
        raise CnnlabError(f"the seed model needs images of at least 4x4 pixels, got {image_size[0]}x{image_size[1]}")
    return keras_init(nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, 32, 3, padding="same"), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 3, padding="same"), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        dense1=nn.Linear(64 * h * w, 128), relu3=nn.ReLU(),
        dense2=nn.Linear(128, num_classes),
    )))


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
