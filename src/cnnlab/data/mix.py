"""MixUp and CutMix: augmentations that blend two images of a batch and their labels, so they return soft
targets (B, classes) that `F.cross_entropy` takes as they are.

    x, y = mix(["mixup", "cutmix"], x, y, g, num_classes)   # one of the two per batch when both are named

Drawn from the generator `g`, as every augmentation here: a seeded run mixes the same way after a resume.
Hand-written rather than kornia's: 0.85 against 2.09 ms (MixUp) and 0.62 against 6.55 ms (CutMix) for 256 CIFAR
images (benchmarks/augment.py, Intel Xeon avx512_bf16 class, 11-25).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIXUP_ALPHA = 0.2  # Beta(0.2, 0.2): most mixes are mild (Zhang et al.'s value for CIFAR and ImageNet)
CUTMIX_ALPHA = 1.0  # Beta(1, 1): a box of uniformly random area (Yun et al.)


def mix(names: list[str], x: torch.Tensor, y: torch.Tensor, g: torch.Generator,
        num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image with another of the batch (a random pairing); labels become class probabilities."""
    seed, which = int(torch.randint(2**31, (1,), generator=g)), torch.rand(1, generator=g)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    rng = np.random.default_rng(seed)  # NumPy's Beta sampler, seeded from `g`
    soft = F.one_hot(y, num_classes).to(x.dtype)
    kind = names[0] if len(names) == 1 else names[int(which < 0.5)]
    if kind == "mixup":
        lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
        x = lam * x + (1 - lam) * x[perm]
    else:
        x, lam = _cutmix(x, perm, float(rng.beta(CUTMIX_ALPHA, CUTMIX_ALPHA)), rng)
    return x, lam * soft + (1 - lam) * soft[perm]


def _cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Paste a box of area (1 - lam) from each image's partner; lam becomes the area that stayed."""
    _, _, h, w = x.shape
    cut = np.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return x, 1 - (y1 - y0) * (x1 - x0) / (h * w)
