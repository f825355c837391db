"""The tutorial's "advanced CNN architectures": the standard CIFAR networks, registered by name.

Each builder takes (in_channels, num_classes, image_size) like every model in cnnlab.models, and ends in
global average pooling, so any input size and channel count works. Parameter counts for 32x32x3 inputs
and 10 classes, as published (the tests check them):

    resnet20     269,722  He et al. 2016, CIFAR ResNet, option-A (zero-padding) shortcuts
    resnet56     853,018  the same, 9 blocks per stage
    resnet18  11,173,962  the CIFAR variant of ResNet-18: 3x3 stem, no max-pool (kuangliu/pytorch-cifar)
    vgg11_bn   9,231,114  VGG-11 with BatchNorm and one linear classifier (kuangliu/pytorch-cifar)
    wrn16_4    2,748,890  Wide ResNet 16-4 (Zagoruyko & Komodakis 2016), pre-activation blocks
    mobilenetv2 2,236,682 MobileNetV2 (torchvision's layers) with CIFAR strides: stride 1 in the stem
                          and the second stage, so 32x32 inputs end at 4x4 rather than 1x1
    photonet    1,185,954 for photos (the `photos` preset): a stride-4 stem, then airbench-shaped groups
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models._registry import register


def _head(channels: int, num_classes: int, dropout: float = 0.0) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), *([nn.Dropout(dropout)] if dropout else []),
            nn.Linear(channels, num_classes)]


def _he_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal convolutions (fan-out), unit BatchNorm: the initialization these papers used. Not on
    PyTorch's meta device (a size check builds the network for its shapes): a random draw there imports
    torch._dynamo, 0.8 s."""
    if next(model.parameters()).is_meta:
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# ---------------------------------------------------------------------------------------------------
# ResNets


class PadShortcut(nn.Module):
    """Option A of He et al.: subsample by striding and zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        elif projection:  # option B: a 1x1 convolution learns the projection
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = PadShortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


def resnet(in_channels: int, num_classes: int, widths: tuple[int, ...], blocks: int, projection: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(inplace=True)]
    c_in = widths[0]
    for stage, width in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1, projection))
            c_in = width
    return _he_init(nn.Sequential(*layers, *_head(c_in, num_classes)))


@register("resnet20")
def resnet20(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return resnet(in_channels, num_classes, (16, 32, 64), 3, projection=False)


@register("resnet56")
def resnet56(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return resnet(in_channels, num_classes, (16, 32, 64), 9, projection=False)


@register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return resnet(in_channels, num_classes, (64, 128, 256, 512), 2, projection=True)


# ---------------------------------------------------------------------------------------------------
# VGG


@register("vgg11_bn")
def vgg11_bn(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    layers: list[nn.Module] = []
    c_in = in_channels
    for item in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil: 28x28 inputs still reach 1x1, not 0x0
        else:
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            c_in = item
    return _he_init(nn.Sequential(*layers, *_head(c_in, num_classes)))


# ---------------------------------------------------------------------------------------------------
# Wide ResNet


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut is a 1x1 convolution when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


def wide_resnet(in_channels: int, num_classes: int, depth: int, k: int, dropout: float = 0.0) -> nn.Module:
    n = (depth - 4) // 6
    widths = (16 * k, 32 * k, 64 * k)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
    c_in = 16
    for stage, width in enumerate(widths):
        for b in range(n):
            layers.append(PreActBlock(c_in, width, 2 if stage > 0 and b == 0 else 1, dropout))
            c_in = width
    layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
    return _he_init(nn.Sequential(*layers, *_head(c_in, num_classes)))


@register("wrn16_4")
def wrn16_4(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return wide_resnet(in_channels, num_classes, 16, 4)


# ---------------------------------------------------------------------------------------------------
# MobileNetV2


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
            *([nn.ReLU6(inplace=True)] if act else [])]


class InvertedResidual(nn.Module):
    """Expand with a 1x1 conv, filter depthwise, project back linearly; residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = _conv_bn(c_in, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, c_out, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


@register("mobilenetv2")
def mobilenetv2(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    # (expansion, channels, blocks, stride of the first block); ImageNet's strides 2 in the stem and the
    # second row become 1, as is usual for 32x32 inputs
    settings = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    layers: list[nn.Module] = _conv_bn(in_channels, 32, 3, 1)
    c_in = 32
    for expand, channels, blocks, stride in settings:
        for b in range(blocks):
            layers.append(InvertedResidual(c_in, channels, stride if b == 0 else 1, expand))
            c_in = channels
    layers += _conv_bn(c_in, 1280, 1)
    model = nn.Sequential(*layers, *_head(1280, num_classes, dropout=0.2))
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.is_meta:  # (see _he_init)
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return _he_init(model)


# ---------------------------------------------------------------------------------------------------
# A from-scratch network for photos (the `photos` preset)


def _stage(c_in: int, c_out: int) -> list[nn.Module]:
    """conv, pool, BN, ReLU, conv, BN, ReLU: airbench's group, with ReLU and learned BatchNorm scales."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2, ceil_mode=True), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


@register("photonet")
def photonet(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """For inputs of 96-224 px: two stride-2 convolutions bring 96 px to 24 px for a fraction of the cost
    of full-resolution layers, then three conv groups (widths 64/128/256, each halving the size), global
    average pooling and a linear head. 1.2 M parameters whatever the input size."""
    if min(image_size) < 16:
        raise CnnlabError(f"photonet needs images of at least 16x16 pixels, got {image_size}")
    layers = [nn.Conv2d(in_channels, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True),
              nn.Conv2d(24, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True),
              *_stage(48, 64), *_stage(64, 128), *_stage(128, 256), *_head(256, num_classes)]
    return _he_init(nn.Sequential(*layers))
