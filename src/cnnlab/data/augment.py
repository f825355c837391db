"""Data augmentation on whole batches of tensors: one call per batch, no per-image Python work.

An augmentation is called as `aug(x, g, epoch=e, idx=i)`: a float batch (B, C, H, W), a
`torch.Generator`, the epoch, and the batch's indices into the training set. Random numbers are drawn
on the CPU from `g`, so a seeded run draws the same augmentations on any device.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from cnnlab.errors import CnnlabError


class Augment(Protocol):
    def __call__(self, x: torch.Tensor, g: torch.Generator, *, epoch: int, idx: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------
# Flips


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    mask = (torch.rand(len(x), generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def alternating_flip(x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror half the images in even epochs and exactly the other half in odd ones.

    Random flips show some images the same way several epochs running; alternating guarantees each
    image is seen both ways every two epochs (airbench's finding: worth about as much as 20% more epochs).
    Which half comes first is a fixed hash of the image's index.
    """
    first_half = ((idx.to(torch.int64) * 2654435761) >> 13) & 1  # Knuth's multiplicative hash, one bit
    mask = (first_half ^ (epoch % 2)).bool().to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


# ---------------------------------------------------------------------------------------------------
# Translations, crops, cutout


def translate(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    """Shift each image by up to `pad` pixels each way, filling the border by reflection (random crop)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy, ox = torch.randint(0, 2 * pad + 1, (2, b), generator=g).to(x.device)
    # Every possible crop as a view (B, C, 2p+1, 2p+1, H, W), then one pick per image: whole rows are
    # copied, not single pixels (0.50 against 2.85 ms for 256 images with per-pixel indices).
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(b, device=x.device), :, oy, ox]


def cutout(x: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Zero one `size` x `size` square per image at a random place (partly off the edge is allowed)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=g).to(x.device)
    cx = torch.randint(0, w, (b,), generator=g).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= size // 2) & ((xs - cx[:, None, None]).abs() <= size // 2)
    return x.masked_fill(inside[:, None], 0.0)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per image, a random region covering `scale` of its area with aspect `ratio`, scaled back to full size.

    The training half of `--resize crop`: the cache holds the centre crop that evaluation sees, and
    training sees random parts of it at random zooms (timm's and torchvision's RandomResizedCrop, here as
    one batched bilinear resampling rather than per-image crops).
    """
    b = len(x)
    area = torch.empty(b).uniform_(*scale, generator=g)
    aspect = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of each side
    cx, cy = (torch.rand(2, b, generator=g) * 2 - 1) * torch.stack([1 - w, 1 - h])  # centres, in [-1, 1]
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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


def rotate_shift(x: torch.Tensor, g: torch.Generator, degrees: float, shift: float) -> torch.Tensor:
    """Random rotation U(-degrees, degrees) and shifts U(-shift, shift) of the size, per image.

    What Keras' ImageDataGenerator(rotation_range, width_shift_range, height_shift_range) draws.
    """
    b = len(x)
    u = torch.rand(3, b, generator=g) * 2 - 1
    return affine(x, u[0] * degrees, u[1] * shift, u[2] * shift)


# ---------------------------------------------------------------------------------------------------
# Named pipelines (the `--augment` choices)


def keras_tutorial(x: torch.Tensor, g: torch.Generator, **_) -> torch.Tensor:
    """The tutorial's ImageDataGenerator(rotation_range=20, shifts 0.2, horizontal_flip=True)."""
    return hflip(rotate_shift(x, g, degrees=20.0, shift=0.2), g)


def flip_translate(x: torch.Tensor, g: torch.Generator, *, epoch: int, idx: torch.Tensor) -> torch.Tensor:
    """airbench's augmentation: alternating flips and 2-pixel reflected translations."""
    return translate(alternating_flip(x, idx, epoch), g, pad=2)


def flip_translate_cutout(x: torch.Tensor, g: torch.Generator, *, epoch: int, idx: torch.Tensor) -> torch.Tensor:
    """The same plus a 12-pixel cutout, for longer runs that would otherwise overfit."""
    return cutout(flip_translate(x, g, epoch=epoch, idx=idx), g, size=12)


def flip_crop(x: torch.Tensor, g: torch.Generator, *, epoch: int, idx: torch.Tensor) -> torch.Tensor:
    """For photos: alternating flips and a random resized crop (scale 0.35-1, aspect 3:4 to 4:3)."""
    return random_resized_crop(alternating_flip(x, idx, epoch), g)


# ---------------------------------------------------------------------------------------------------
# Colour and erasing, hand-written: faster than kornia's on these batches (benchmarks/augment.py, 256 CIFAR
# images, Intel Xeon avx512_bf16 class, 11-25: colour jitter 1.61 ms against 2.73, erasing 0.64 against 1.65)


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """Per image, brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s], on [0, 1]
    pixels (torchvision's ColorJitter(0.4, 0.4, 0.4) without hue, in a fixed order)."""
    b = len(x)
    f = (1 + (torch.rand(3, b, 1, 1, 1, generator=g) * 2 - 1) * strength).to(x.device, x.dtype)
    x = x * f[0]
    mean = x.mean((1, 2, 3), keepdim=True) if x.shape[1] == 1 else _gray(x).mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * f[1]
    if x.shape[1] == 3:
        gray = _gray(x)
        x = gray + (x - gray) * f[2]
    return x.clamp(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """With probability `p` per image, one rectangle of `area` of the image and aspect `ratio` filled with a
    random colour (Zhong et al. 2017; timm's mode "rand"), on [0, 1] pixels."""
    b, _, h, w = x.shape
    u = torch.rand(5, b, generator=g)
    a = area[0] + (area[1] - area[0]) * u[0]
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    eh, ew = ((a * r).sqrt() * h).clamp(1, h).floor(), ((a / r).sqrt() * w).clamp(1, w).floor()
    top, left = (u[2] * (h - eh + 1)).floor(), (u[3] * (w - ew + 1)).floor()
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    inside = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None]) & (xs >= left[:, None, None])
              & (xs < (left + ew)[:, None, None]) & (u[4] < p)[:, None, None])
    colour = torch.rand(b, x.shape[1], 1, 1, generator=g).to(x.device, x.dtype)
    return torch.where(inside[:, None].to(x.device), colour, x)


def rand_augment(x: torch.Tensor, g: torch.Generator, n: int = 2, m: int = 9) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020): `n` of the usual 14 operations per image at magnitude `m` of 30,
    by kornia (its batched version: 8.5 ms for 256 CIFAR images here). Drawn from `g`, so seeded and resumable."""
    from kornia.augmentation.auto import RandAugment

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        return RandAugment(n=n, m=m)(x).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------
# The `--augment` names, alone or joined with "+" (e.g. "flip-crop+randaugment+erasing+mixup")

AUGMENTS: dict[str, Augment] = {
    "none": lambda x, g, **_: x,
    "seed": keras_tutorial,
    "flip-translate": flip_translate,
    "flip-translate-cutout": flip_translate_cutout,
    "flip-crop": flip_crop,
    "flip": lambda x, g, **_: hflip(x, g),
    "crop": lambda x, g, **_: random_resized_crop(x, g),
}
PIXEL_OPS = {"color-jitter": color_jitter, "randaugment": rand_augment,  # on [0, 1] pixels, not normalized ones
             "erasing": random_erasing}
MIXERS = ("mixup", "cutmix")  # change the labels too: see mix.py


class Pipeline:
    """Image operations in the order named, each on the batch the previous one returned. Pixel operations
    see [0, 1] pixels: normalized inputs are mapped back with `norm` for them, and forward again after."""

    def __init__(self, name: str):
        self.name = name
        self.steps = [p for p in name.split("+") if p not in MIXERS]

    def __call__(self, x: torch.Tensor, g: torch.Generator, *, epoch: int, idx: torch.Tensor, norm=None):
        for step in self.steps:
            if step in PIXEL_OPS:
                x = PIXEL_OPS[step](norm.inverse(x), g) if norm is not None else PIXEL_OPS[step](x, g)
                x = norm.apply_to_unit(x) if norm is not None else x
            else:
                x = AUGMENTS[step](x, g, epoch=epoch, idx=idx)
        return x


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
