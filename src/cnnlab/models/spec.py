"""A compact layer-spec string for quick experiments: `--model "c32-p-c64-p-f-d128"`.

Grammar (layers separated by "-", read left to right; N, K, S are whole numbers, P a fraction):

    spec  := layer ("-" layer)*
    layer := "c" N ["k" K] ["s" S] ["b"]   convolution, N filters, K x K (default 3), stride S (default 1),
                                           "same" padding, then BatchNorm if "b", then ReLU
           | "p" [K]                       max-pool K x K (default 2)
           | "a" [K]                       average-pool K x K (default 2)
           | "g"                           global average pool (and flatten)
           | "f"                           flatten
           | "d" N                         dense layer of N units, then ReLU
           | "r" P                         dropout with probability P, 0 <= P < 1 (e.g. r0.5)

The classifier (a dense layer with one output per class) is added at the end, after an implicit flatten.
The tutorial's network is "c32-p-c64-p-f-d128": 545,098 parameters for CIFAR-10, as `seed` has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models._registry import SPEC_PATTERN

LAYER = re.compile(r"c(?P<conv>\d+)(?:k(?P<k>\d+))?(?:s(?P<s>\d+))?(?P<bn>b)?|p(?P<pool>\d+)?|a(?P<avg>\d+)?"
                   r"|(?P<gap>g)|(?P<flat>f)|d(?P<dense>\d+)|r(?P<drop>\d*\.?\d+)")
GRAMMAR = "c<N>[k<K>][s<S>][b], p[<K>], a[<K>], g, f, d<N>, r<P>"
MAX_WIDTH, MAX_KERNEL = 65_536, 64  # far beyond any useful CNN, and far below what exhausts memory
MAX_PARAMS = 500_000_000  # 2 GB of fp32 weights: a typo such as d1280000 fails here, not in the allocator


def looks_like_spec(name: str) -> bool:
    """Spec strings start with a layer letter followed by a digit or end; registered names are words."""
    return bool(re.fullmatch(SPEC_PATTERN, name))


def _fail(spec: str, why: str) -> CnnlabError:
    return CnnlabError(f"bad model spec {spec!r}: {why} (layers: {GRAMMAR}; see `cnnlab models`)")


def check_syntax(spec: str) -> None:
    tokens = spec.strip().split("-")
    if not spec.strip() or any(not t for t in tokens):
        raise _fail(spec, "empty layer (two dashes in a row, or a dash at an end)")
    for position, token in enumerate(tokens, 1):
        if LAYER.fullmatch(token) is None:
            raise _fail(spec, f"layer {position} {token!r} is not one of")


def build(spec: str, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    """The network a spec describes, for inputs of (in_channels, *image_size)."""
    check_syntax(spec)
    walk = _Walk(spec, in_channels, *image_size)
    layers: list[nn.Module] = []
    for position, token in enumerate(spec.strip().split("-"), 1):
        layers += _layer(walk, token, f"layer {position} {token!r}")
    if walk.flat is None:
        layers.append(nn.Flatten())
        walk.flat = walk.channels * walk.h * walk.w
    walk.budget(walk.flat * num_classes + num_classes, "the classifier")
    layers.append(nn.Linear(walk.flat, num_classes))
    return nn.Sequential(*layers)


@dataclass
class _Walk:
    """The shape of the data as the layers so far leave it, and the parameters they hold."""
    spec: str
    channels: int
    h: int
    w: int
    flat: int | None = None  # the feature count once flattened
    params: int = 0

    def fail(self, why: str) -> CnnlabError:
        return _fail(self.spec, why)

    def budget(self, count: int, where: str) -> None:
        self.params += count
        if self.params > MAX_PARAMS:
            raise self.fail(f"{where} brings the network to over {MAX_PARAMS:,} parameters")


def _layer(walk: _Walk, token: str, where: str) -> list[nn.Module]:
    """The modules of one token, checked against the shape so far (which it updates)."""
    m = LAYER.fullmatch(token)
    if walk.flat is not None and token[0] in "cpagf":
        raise walk.fail(f"{where} needs an image, but the layers before it flattened it")
    if m["conv"]:
        return _conv(walk, m, where)
    if token[0] in "pa" and not m["gap"]:
        k = int(m["pool"] or m["avg"] or 2)
        if k < 1 or k > walk.h or k > walk.w:
            raise walk.fail(f"{where}: cannot pool {walk.h}x{walk.w} by {k}")
        walk.h, walk.w = walk.h // k, walk.w // k
        return [nn.MaxPool2d(k) if token[0] == "p" else nn.AvgPool2d(k)]
    if m["gap"]:
        walk.flat = walk.channels
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if m["flat"]:
        walk.flat = walk.channels * walk.h * walk.w
        return [nn.Flatten()]
    if m["dense"]:
        return _dense(walk, int(m["dense"]), where)
    p = float(m["drop"])
    if not 0 <= p < 1:
        raise walk.fail(f"{where}: dropout must be at least 0 and below 1")
    return [nn.Dropout(p)]


def _conv(walk: _Walk, m: re.Match, where: str) -> list[nn.Module]:
    n, k, s = int(m["conv"]), int(m["k"] or 3), int(m["s"] or 1)
    if n < 1 or k < 1 or s < 1:
        raise walk.fail(f"{where}: filters, kernel and stride must be at least 1")
    if n > MAX_WIDTH or k > MAX_KERNEL or s > MAX_KERNEL:
        raise walk.fail(f"{where}: at most {MAX_WIDTH:,} filters and a kernel and stride of {MAX_KERNEL}")
    walk.budget(walk.channels * n * k * k + n, where)
    conv = (nn.Conv2d(walk.channels, n, k, padding="same", bias=not m["bn"]) if s == 1
            else nn.Conv2d(walk.channels, n, k, stride=s, padding=k // 2, bias=not m["bn"]))
    walk.channels = n
    if s > 1:
        walk.h, walk.w = (walk.h + 2 * (k // 2) - k) // s + 1, (walk.w + 2 * (k // 2) - k) // s + 1
    return [conv, *([nn.BatchNorm2d(n)] if m["bn"] else []), nn.ReLU(inplace=True)]


def _dense(walk: _Walk, n: int, where: str) -> list[nn.Module]:
    if walk.flat is None:
        raise walk.fail(f"{where}: flatten (f or g) before a dense layer")
    if not 1 <= n <= MAX_WIDTH:
        raise walk.fail(f"{where}: a dense layer needs 1 to {MAX_WIDTH:,} units")
    walk.budget(walk.flat * n + n, where)
    layer, walk.flat = nn.Linear(walk.flat, n), n
    return [layer, nn.ReLU(inplace=True)]
