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


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g) * (high - low) + low).to(device)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability `p`."""
    mask = (torch.rand(len(x), generator=g) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(3), x)


def rotate_shift(x: torch.Tensor, g: torch.Generator, degrees: float, shift: float) -> torch.Tensor:
    """Rotate by U(-degrees, degrees) about the centre and shift by U(-shift, shift) of the size.

    Matches Keras' ImageDataGenerator(rotation_range, width_shift_range, height_shift_range):
    bilinear sampling, with pixels outside the image filled from the nearest edge (fill_mode="nearest").
    """
    b, _, h, w = x.shape
    angle = _uniform(b, -degrees, degrees, g, x.device) * (math.pi / 180)
    tx = _uniform(b, -shift, shift, g, x.device) * 2  # a shift of s*W pixels is 2s in [-1, 1] coordinates
    ty = _uniform(b, -shift, shift, g, x.device) * 2
    cos, sin = angle.cos(), angle.sin()
    # affine_grid works in [-1, 1] coordinates per axis; the h/w factors keep rotations rigid
    # on non-square images.
    theta = torch.stack([torch.stack([cos, -sin * h / w, tx], 1),
                         torch.stack([sin * w / h, cos, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
