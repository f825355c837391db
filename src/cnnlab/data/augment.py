"""Data augmentation on whole batches of tensors: one call per batch, no per-image Python work.

Every random operation is split in two: `draw` takes its numbers from a `torch.Generator` on the CPU (the
same numbers on any device, so a seeded run is reproducible anywhere), and `apply` uses them where the batch
is. The training loader draws a whole epoch's numbers at its start and copies them to the device once
(loader.py), so a step on a GPU never waits for the host; called directly, a pipeline draws and applies
in one go, which gives the same batches:

    pipeline = get("flip-translate+erasing")
    x = pipeline(x, g, epoch=e, idx=i, norm=norm)                     # draw and apply
    drawn = pipeline.draw(g, tuple(x.shape))                          # or the two halves apart
    x = pipeline.apply(x, drawn, epoch=e, idx=i, norm=norm)

`idx` is the batch's indices into the training set (alternating flips are a function of it and the epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from cnnlab.errors import CnnlabError

Shape = tuple[int, ...]  # a batch's (B, C, H, W)


class Op(NamedTuple):
    """One random operation: `draw(g, shape)` -> its numbers (CPU tensors and plain numbers, in the order the
    generator gives them), `apply(x, drawn, epoch, idx)` -> the batch changed."""
    draw: Callable[[torch.Generator, Shape], tuple]
    apply: Callable[..., torch.Tensor]
    pixels: bool = False  # works on [0, 1] pixels: normalized inputs are mapped back for it, then forward again


def _nothing(g: torch.Generator, shape: Shape) -> tuple:
    return ()


# ---------------------------------------------------------------------------------------------------
# Flips


def _draw_flips(g: torch.Generator, shape: Shape, p: float = 0.5) -> tuple:
    return (torch.rand(shape[0], generator=g) < p,)


def _flip_where(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None) -> torch.Tensor:
    return torch.where(drawn[0].to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    return _flip_where(x, _draw_flips(g, tuple(x.shape), p))


def alternating_flip(x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror half the images in even epochs and exactly the other half in odd ones.

    Random flips show some images the same way several epochs running; alternating guarantees each
    image is seen both ways every two epochs (airbench's finding: worth about as much as 20% more epochs).
    Which half comes first is a fixed hash of the image's index (computed where `idx` is: nothing to draw).
    """
    first_half = ((idx.to(torch.int64) * 2654435761) >> 13) & 1  # Knuth's multiplicative hash, one bit
    mask = (first_half ^ (epoch % 2)).bool().to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


# ---------------------------------------------------------------------------------------------------
# Translations, crops, cutout


def _draw_offsets(g: torch.Generator, shape: Shape, pad: int) -> tuple:
    return (torch.randint(0, 2 * pad + 1, (2, shape[0]), generator=g),)


def _translate(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None, *, pad: int) -> torch.Tensor:
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy, ox = drawn[0].to(x.device)
    # Every possible crop as a view (B, C, 2p+1, 2p+1, H, W), then one pick per image: whole rows are
    # copied, not single pixels (0.50 against 2.85 ms for 256 images with per-pixel indices).
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(b, device=x.device), :, oy, ox]


def translate(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    """Shift each image by up to `pad` pixels each way, filling the border by reflection (random crop)."""
    return _translate(x, _draw_offsets(g, tuple(x.shape), pad), pad=pad)


def _draw_squares(g: torch.Generator, shape: Shape) -> tuple:
    b, _, h, w = shape
    return torch.randint(0, h, (b,), generator=g), torch.randint(0, w, (b,), generator=g)


def _cutout(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None, *, size: int) -> torch.Tensor:
    _, _, h, w = x.shape
    cy, cx = (t.to(x.device) for t in drawn)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= size // 2) & ((xs - cx[:, None, None]).abs() <= size // 2)
    return x.masked_fill(inside[:, None], 0.0)


def cutout(x: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Zero one `size` x `size` square per image at a random place (partly off the edge is allowed)."""
    return _cutout(x, _draw_squares(g, tuple(x.shape)), size=size)


def _draw_regions(g: torch.Generator, shape: Shape, scale: tuple[float, float] = (0.35, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple:
    b = shape[0]
    area = torch.empty(b).uniform_(*scale, generator=g)
    aspect = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of each side
    cx, cy = (torch.rand(2, b, generator=g) * 2 - 1) * torch.stack([1 - w, 1 - h])  # centres, in [-1, 1]
    zero = torch.zeros(b)
    return (torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1),)


def _resample(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None) -> torch.Tensor:
    grid = F.affine_grid(drawn[0].to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per image, a random region covering `scale` of its area with aspect `ratio`, scaled back to full size.

    The training half of `--resize crop`: the cache holds the centre crop that evaluation sees, and
    training sees random parts of it at random zooms (timm's and torchvision's RandomResizedCrop, here as
    one batched bilinear resampling rather than per-image crops).
    """
    return _resample(x, _draw_regions(g, tuple(x.shape), scale, ratio))


# ---------------------------------------------------------------------------------------------------
# Rotation and shift (Keras' ImageDataGenerator)


def affine(x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Rotate each image by `angle` degrees about its centre and move its content right by `tx` and
    down by `ty`, as fractions of its width and height.

    Bilinear sampling; pixels from outside the image take the nearest edge value (Keras' "nearest" fill).
    """
    _, _, h, w = x.shape
    rad = angle.to(x.device) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    # affine_grid maps each output pixel to where it samples the input, in [-1, 1] coordinates per axis:
    # moving content by s*W pixels means sampling 2s to the other side, and the h/w factors keep
    # rotations rigid on non-square images.
    theta = torch.stack([torch.stack([cos, -sin * h / w, -2 * tx.to(x.device)], 1),
                         torch.stack([sin * w / h, cos, -2 * ty.to(x.device)], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _draw_turns(g: torch.Generator, shape: Shape, degrees: float, shift: float) -> tuple:
    u = torch.rand(3, shape[0], generator=g) * 2 - 1
    return (torch.stack([u[0] * degrees, u[1] * shift, u[2] * shift]),)


def _turn(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None) -> torch.Tensor:
    angle, tx, ty = drawn[0]
    return affine(x, angle, tx, ty)


def rotate_shift(x: torch.Tensor, g: torch.Generator, degrees: float, shift: float) -> torch.Tensor:
    """Random rotation U(-degrees, degrees) and shifts U(-shift, shift) of the size, per image.

    What Keras' ImageDataGenerator(rotation_range, width_shift_range, height_shift_range) draws.
    """
    return _turn(x, _draw_turns(g, tuple(x.shape), degrees, shift))


def keras_tutorial(x: torch.Tensor, g: torch.Generator, **_) -> torch.Tensor:
    """The tutorial's ImageDataGenerator(rotation_range=20, shifts 0.2, horizontal_flip=True)."""
    return get("seed")(x, g, epoch=0, idx=None)


# ---------------------------------------------------------------------------------------------------
# Colour and erasing, hand-written: faster than kornia's on these batches (benchmarks/augment.py, 256 CIFAR
# images, Intel Xeon avx512_bf16 class, 11-25: colour jitter 1.61 ms against 2.73, erasing 0.64 against 1.65)


def _draw_jitter(g: torch.Generator, shape: Shape, strength: float = 0.4) -> tuple:
    return (1 + (torch.rand(3, shape[0], 1, 1, 1, generator=g) * 2 - 1) * strength,)


def _jitter(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None) -> torch.Tensor:
    f = drawn[0].to(x.device, x.dtype)
    x = x * f[0]
    mean = x.mean((1, 2, 3), keepdim=True) if x.shape[1] == 1 else _gray(x).mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * f[1]
    if x.shape[1] == 3:
        gray = _gray(x)
        x = gray + (x - gray) * f[2]
    return x.clamp(0, 1)


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Per image, brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s], on [0, 1]
    pixels (torchvision's ColorJitter(0.4, 0.4, 0.4) without hue, in a fixed order)."""
    return _jitter(x, _draw_jitter(g, tuple(x.shape), strength))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _draw_rectangles(g: torch.Generator, shape: Shape, p: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3),
                     ratio: tuple[float, float] = (0.3, 3.3)) -> tuple:
    b, c, h, w = shape
    u = torch.rand(5, b, generator=g)
    a = area[0] + (area[1] - area[0]) * u[0]
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    eh, ew = ((a * r).sqrt() * h).clamp(1, h).floor(), ((a / r).sqrt() * w).clamp(1, w).floor()
    top, left = (u[2] * (h - eh + 1)).floor(), (u[3] * (w - ew + 1)).floor()
    box = torch.stack([top, top + eh, left, left + ew, (u[4] < p).float()])  # rows, columns, erased or not
    return box, torch.rand(b, c, 1, 1, generator=g)


def _erase(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None) -> torch.Tensor:
    _, _, h, w = x.shape
    top, bottom, left, right, erased = (v[:, None, None] for v in drawn[0].to(x.device))
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right) & (erased > 0)
    return torch.where(inside[:, None], drawn[1].to(x.device, x.dtype), x)


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """With probability `p` per image, one rectangle of `area` of the image and aspect `ratio` filled with a
    random colour (Zhong et al. 2017; timm's mode "rand"), on [0, 1] pixels."""
    return _erase(x, _draw_rectangles(g, tuple(x.shape), p, area, ratio))


def _draw_seed(g: torch.Generator, shape: Shape) -> tuple:
    return (int(torch.randint(2**62, (1,), generator=g)),)


def _rand_augment(x: torch.Tensor, drawn: tuple, epoch: int = 0, idx: Any = None, *, n: int = 2,
                  m: int = 9) -> torch.Tensor:
    from kornia.augmentation.auto import RandAugment

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(drawn[0])
        return RandAugment(n=n, m=m)(x).clamp(0, 1)


def rand_augment(x: torch.Tensor, g: torch.Generator, n: int = 2, m: int = 9) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020): `n` of the usual 14 operations per image at magnitude `m` of 30,
    by kornia (its batched version: 8.5 ms for 256 CIFAR images here). Its own numbers are kornia's, drawn
    from a seed taken from `g`: seeded and resumable, but drawn on each step (not ahead, as the others are)."""
    return _rand_augment(x, _draw_seed(g, tuple(x.shape)), n=n, m=m)


# ---------------------------------------------------------------------------------------------------
# The `--augment` names, alone or joined with "+" (e.g. "flip-crop+randaugment+erasing+mixup")

FLIPS = Op(_draw_flips, _flip_where)
ALTERNATING = Op(_nothing, lambda x, drawn, epoch, idx: alternating_flip(x, idx, epoch))
NUDGES = Op(partial(_draw_offsets, pad=2), partial(_translate, pad=2))  # airbench's 2-pixel translations
CROPS = Op(_draw_regions, _resample)

AUGMENTS: dict[str, list[Op]] = {
    "none": [],
    # the tutorial's ImageDataGenerator(rotation_range=20, shifts 0.2, horizontal_flip=True)
    "seed": [Op(partial(_draw_turns, degrees=20.0, shift=0.2), _turn), FLIPS],
    "flip-translate": [ALTERNATING, NUDGES],  # airbench's: alternating flips, 2-pixel reflected translations
    "flip-translate-cutout": [ALTERNATING, NUDGES, Op(_draw_squares, partial(_cutout, size=12))],  # longer runs
    "flip-crop": [ALTERNATING, CROPS],  # photos: a random resized crop (scale 0.35-1, aspect 3:4 to 4:3)
    "flip": [FLIPS],
    "crop": [CROPS],
}
PIXEL_OPS: dict[str, Op] = {"color-jitter": Op(_draw_jitter, _jitter, pixels=True),
                            "randaugment": Op(_draw_seed, _rand_augment, pixels=True),
                            "erasing": Op(_draw_rectangles, _erase, pixels=True)}
MIXERS = ("mixup", "cutmix")  # change the labels too: see mix.py


class Pipeline:
    """Image operations in the order named, each on the batch the previous one returned. Pixel operations
    see [0, 1] pixels: normalized inputs are mapped back with `norm` for them, and forward again after."""

    def __init__(self, name: str):
        self.name = name
        self.ops = [op for p in name.split("+") if p not in MIXERS
                    for op in (AUGMENTS[p] if p in AUGMENTS else [PIXEL_OPS[p]])]

    def draw(self, g: torch.Generator, shape: Shape) -> list[tuple]:
        """The numbers of every operation for one batch of `shape`, drawn in order from `g` on the CPU."""
        return [op.draw(g, shape) for op in self.ops]

    def apply(self, x: torch.Tensor, drawn: list[tuple], *, epoch: int, idx: Any, norm=None) -> torch.Tensor:
        for op, numbers in zip(self.ops, drawn, strict=True):
            if op.pixels and norm is not None:
                x = norm.apply_to_unit(op.apply(norm.inverse(x), numbers, epoch, idx))
            else:
                x = op.apply(x, numbers, epoch, idx)
        return x

    def __call__(self, x: torch.Tensor, g: torch.Generator, *, epoch: int, idx: Any, norm=None) -> torch.Tensor:
        return self.apply(x, self.draw(g, tuple(x.shape)), epoch=epoch, idx=idx, norm=norm)


def get(name: str) -> Pipeline:
    parts = name.split("+")
    unknown = [p for p in parts if p not in AUGMENTS and p not in PIXEL_OPS and p not in MIXERS]
    if unknown or not name:
        choices = ", ".join([*AUGMENTS, *PIXEL_OPS, *MIXERS])
        raise CnnlabError(f"unknown augmentation {unknown[0] if unknown else name!r}; choose one of: {choices}, "
                          "or several joined with + (e.g. flip-crop+randaugment+mixup)")
    return Pipeline(name)


def mixers(name: str) -> list[str]:
    """The label-mixing augmentations a name asks for (mixup, cutmix: one of them per batch when both)."""
    return [p for p in name.split("+") if p in MIXERS]
