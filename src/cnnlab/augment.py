"""Data augmentation on whole batches of tensors: one call per batch, no per-image Python work.

Every op takes a float batch (B, C, H, W) and a `torch.Generator`, so a seeded run draws the same
augmentations on any device (the random numbers are drawn on the CPU, then moved).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import CnnlabError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    mask = (torch.rand(len(x), generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


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


def keras_tutorial(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The tutorial's ImageDataGenerator(rotation_range=20, shifts 0.2, horizontal_flip=True)."""
    return hflip(rotate_shift(x, g, degrees=20.0, shift=0.2), g)


AUGMENTS: dict[str, Augment] = {
    "none": lambda x, g: x,
    "seed": keras_tutorial,
}


def get(name: str) -> Augment:
    if name not in AUGMENTS:
        raise CnnlabError(f"unknown augmentation {name!r}; choose one of: {', '.join(AUGMENTS)}")
    return AUGMENTS[name]
