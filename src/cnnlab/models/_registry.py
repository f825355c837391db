"""The model registry: names to factories `(in_channels, num_classes, image_size) -> nn.Module`.

Like timm's `_registry.py`, it imports nothing of the project but its error type, so every family of
networks (networks.py, zoo.py, backbones.py) imports it and registers itself, and the package's `build`
imports the families: no cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from cnnlab.errors import CnnlabError

# A layer-spec string (spec.py) starts with a layer letter followed by a digit, a dash or nothing; registered
# names are words. spec.looks_like_spec reads the same pattern.
SPEC_PATTERN = r"[cpagfdr](\d.*|-.*)?"

Builder = Callable[[int, int, tuple[int, int]], nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str, *, replace: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: make a model factory available by `name` (an existing name needs replace=True)."""
    if re.fullmatch(SPEC_PATTERN, name):
        raise CnnlabError(f"{name!r} reads as a layer spec; give the model a name that is a word")

    def wrap(fn: Builder) -> Builder:
        if name in MODELS and MODELS[name] is not fn and not replace:
            raise CnnlabError(f"a model named {name!r} is already registered; pass replace=True to override it")
        MODELS[name] = fn
        return fn
    return wrap


