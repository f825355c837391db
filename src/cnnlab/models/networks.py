"""cnnlab's own networks: the tutorial's CNN (`seed`) and airbench's (`airbench94`, `airbench-s`)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models import spec
from cnnlab.models._registry import Builder, register


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
    if (dense := 64 * h * w * 128) > spec.MAX_PARAMS:  # refused before its weights are allocated (18 GB at 3000 px)
        raise CnnlabError(f"the seed model at {image_size[0]}x{image_size[1]} px would have over {dense:,} parameters "
                          f"(at most {spec.MAX_PARAMS:,}); choose a smaller --image-size or a convolutional model")
    # ReLU and max-pooling commute (ReLU never reorders values), so pooling first computes exactly the
    # tutorial's function on a quarter of the pixels: 8.4 -> 6.0 ms per bf16 step here, with in-place ReLU.
    return keras_init(nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, 32, 3, padding="same"), pool1=nn.MaxPool2d(2), relu1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(32, 64, 3, padding="same"), pool2=nn.MaxPool2d(2), relu2=nn.ReLU(inplace=True),
        flatten=nn.Flatten(),
        dense1=nn.Linear(64 * h * w, 128), relu3=nn.ReLU(inplace=True),
        dense2=nn.Linear(128, num_classes),
    )))


class Whiten(nn.Conv2d):
    """A 2x2 conv whose filters whiten image patches: set once from data by `init_from_data`."""

    def __init__(self, in_channels: int, eps: float = 5e-4, keep: int | None = None):
        keep = min(keep or in_channels * 4, in_channels * 4)  # patch directions kept, largest variance first
        super().__init__(in_channels, 2 * keep, kernel_size=2, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)  # the whitening is computed, never learned

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Filters = eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), and their negatives.

        Decorrelating the input this way lets the first trained layer learn at the same rate in every
        direction, which is worth several epochs of plain training.
        """
        c = x.shape[1]
        # every 2x2 patch, channel-major like the filters: (N, C*4, (H-1)*(W-1)). Their products are summed in
        # float32 by one batched matrix product (0.03 s for 5,000 CIFAR images, against 0.55 s for the patches
        # in float64); the covariance differs by 2e-6, far below the eps added to its eigenvalues.
        patches = F.unfold(x.float(), kernel_size=2)
        count = patches.shape[0] * patches.shape[2]
        mean = patches.sum((0, 2)).double() / count
        cov = torch.bmm(patches, patches.transpose(1, 2)).sum(0).double() / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / (eigenvalues + self.eps).sqrt()[:, None]).view(c * 4, c, 2, 2)
        filters = filters[c * 4 - self.out_channels // 2:]  # eigh sorts ascending: the last are the largest
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        def bn() -> nn.BatchNorm2d:
            norm = nn.BatchNorm2d(c_out, momentum=bn_momentum, eps=1e-12)
            norm.weight.requires_grad_(False)  # scale fixed at 1: only the shift is learned
            return norm

        super().__init__(OrderedDict(
            conv1=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), pool=nn.MaxPool2d(2), norm1=bn(),
            act1=nn.GELU(), conv2=nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), norm2=bn(), act2=nn.GELU()))
        for conv in (self.conv1, self.conv2):  # identity-like start: the first filters pass inputs through
            nn.init.dirac_(conv.weight[:conv.in_channels])


class GlobalMaxPool(nn.Module):
    """Each channel's largest value, (N, C, H, W) -> (N, C): nn.AdaptiveMaxPool2d(1) as a plain reduction, which
    every ONNX exporter translates (PyTorch 2.11's, the one on the GPU machine, has no adaptive_max_pool2d).
    `max` with its indices, as the pool: `amax` splits a tie's gradient, and torch.compile's inductor turned
    that into NaN gradients under bf16 (the H200 run's `fast --compile` stopped at step 2, the CPU's too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).max(dim=2).values


class AirNet(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int],
                 bn_momentum: float = 0.4, scale: float = 1 / 9, keep: int | None = None):
        whiten = Whiten(in_channels, keep=keep)
        super().__init__(OrderedDict(
            whiten=whiten, act=nn.GELU(),
            group1=ConvGroup(whiten.out_channels, widths[0], bn_momentum),
            group2=ConvGroup(widths[0], widths[1], bn_momentum),
            group3=ConvGroup(widths[1], widths[2], bn_momentum),
            pool=GlobalMaxPool(),
            head=nn.Linear(widths[2], num_classes, bias=False)))
        self.scale = scale  # small logits at the start keep early steps from saturating the softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale

    def init_from_data(self, x: torch.Tensor) -> None:
        self.whiten.init_from_data(x)


def _airnet(widths: tuple[int, int, int], **options) -> Builder:
    def build_airnet(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
        if min(image_size) < 16:
            raise CnnlabError(f"airbench networks need images of at least 16x16 pixels, got {image_size}")
        return AirNet(in_channels, num_classes, widths, **options)
    return build_airnet


register("airbench94")(_airnet((64, 256, 256)))  # the published widths: the `fast` recipe
# The `quick` recipe's network: narrow where images are largest, and whitening that keeps the 6 largest of
# the 12 patch directions. Measured in one process, 1 epoch, seed 0: all 12 directions and widths 16/32/96
# 68.6% in 10.4 s; 6 directions 70.2% in 9.0 s. Over seeds 0-2, 6 directions: widths 16/32/96 68.3-70.2% in
# 8.0 s, 16/32/128 69.5-71.3% in 9.1 s. The wider last group buys a safe margin over the tutorial's 68%.
register("airbench-s")(_airnet((16, 32, 128), keep=6))
