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

from .errors import CnnlabError


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


AUGMENTS: dict[str, Augment] = {
    "none": lambda x, g, **_: x,
    "seed": keras_tutorial,
    "flip-translate": flip_translate,
    "flip-translate-cutout": flip_translate_cutout,
    "flip-crop": flip_crop,
}


def get(name: str) -> Augment:
    if name not in AUGMENTS:
        raise CnnlabError(f"unknown augmentation {name!r}; choose one of: {', '.join(AUGMENTS)}")
    return AUGMENTS[name]
