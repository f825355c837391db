"""BatchNorm statistics that describe the weights being evaluated.

A BatchNorm layer normalizes a training batch by the batch's own mean and variance, and an evaluated image
by running averages kept with a momentum m: after n steps the running value still holds (1 - m)^n of what
it was n steps before. torchvision's MobileNetV3 keeps m = 0.01 (TensorFlow's decay 0.99, made for
ImageNet's hundreds of thousands of steps): after an epoch of 15 steps on 480 photos the averages are still
86% the values of the epoch's start (the layer's initial 0 and 1, or ImageNet's); a model trained from
scratch that way predicted one class for every held-out image while its training accuracy climbed to 93%.
Any momentum lags weights that move quickly, and a small data set at m = 0.1 has the same problem in a
milder form (8 steps an epoch keep 43% of the start).

The fix chosen: where some layer's averages cannot have caught up within an epoch (`lagging`: more than
`STALE` of the epoch's start still in them), the statistics are computed exactly, before each validation,
from a fixed sample of training images through the weights being evaluated ("precise BatchNorm", Wu and
Johnson 2021). A different momentum was the alternative; it was not taken because the momentum that suits
one run length is wrong for another and still lags a high learning rate, while the pass gives the exact
statistics at the cost of one forward pass over at most `SAMPLE` images an epoch, and leaves the training
arithmetic (which uses batch statistics) untouched: runs whose averages do converge (CIFAR-10 at any
batch size these presets use) train and evaluate bit for bit as before.

The pass uses the images as evaluation sees them (normalized, not augmented), draws no random numbers
(dropout stays off), and is the same on every process (each computes it on the same sample).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.data.dataset import Normalization
from cnnlab.device import autocast

STALE = 0.05  # an epoch's end may keep at most 5% of the averages at its start: m = 0.1 needs 29 steps an epoch
SAMPLE = 1024  # images per pass: enough for the mean and variance of every channel to settle


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def lagging(model: nn.Module, steps_per_epoch: int) -> list[float]:
    """The momenta of the layers whose running averages an epoch of `steps_per_epoch` steps cannot renew
    (None, a cumulative average, counts as never renewed); empty where every layer keeps up."""
    return sorted({m.momentum if m.momentum is not None else 0.0 for m in norm_layers(model)
                   if m.momentum is None or (1 - m.momentum) ** steps_per_epoch > STALE})


def sample(count: int, batch_size: int, seed: int) -> torch.Tensor:
    """A fixed, seeded choice of training images for the pass, a whole number of batches of at least two."""
    n = min(count, SAMPLE)
    batch = max(2, min(batch_size, n))
    n -= n % batch
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + 7))[:n].sort().values


@torch.no_grad()
def recompute(model: nn.Module, x: torch.Tensor, norm: Normalization, device: torch.device,
              dtype: torch.dtype, batch_size: int) -> None:
    """Replace every BatchNorm layer's running mean and variance with their average over `x` (uint8 images)
    in batches of `batch_size`, through the model as it is now. Other layers stay in evaluation mode."""
    layers = norm_layers(model)
    if not layers or len(x) < 2:
        return
    was_training, momenta = model.training, [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    try:
        batch = max(2, min(batch_size, len(x)))
        for i in range(0, len(x) - batch + 1, batch):
            xb = norm(x[i:i + batch].to(device)).contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                model(xb)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
