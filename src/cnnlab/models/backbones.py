"""ImageNet backbones whose weights are torchvision's: the same `state_dict` keys, shapes and forward pass.

torchvision cannot be imported beside this project's PyTorch build, so the networks are defined here, layer
for layer, and `benchmarks/torchvision_parity.py` proves them equal (every key and shape, outputs within
1e-4 in fp32); tests/torchvision_manifest.json pins the keys and shapes it recorded.

    resnet18_imagenet  11.7 M  He et al. 2016, ImageNet stem (7x7 stride 2, max-pool); `resnet18` is the CIFAR one
    resnet50           25.6 M  bottlenecks with the stride on the 3x3 convolution ("ResNet v1.5")
    mobilenet_v3_large  5.5 M  Howard et al. 2019: hard-swish, squeeze-excitation, BatchNorm eps 1e-3
    efficientnet_b0     5.3 M  Tan & Le 2019: MBConv blocks, SiLU, stochastic depth 0.2
    convnext_tiny      28.6 M  Liu et al. 2022: 7x7 depthwise, LayerNorm, layer scale, stochastic depth 0.1
    (parameters with 1000 classes)

Every network here is a `Backbone`: `embed(x)` is the vector the classifier reads, `head` is that final
linear layer (replaced by a fresh one for another class count), and `layer_groups()` splits the parameters
from input to output into the early body, the late body and the head, for discriminative learning rates.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models._registry import register


class Backbone(nn.Module):
    """What fine-tuning needs from a network: its head, its embedding, and where its body splits."""

    head_name: str  # the final nn.Linear's name in the state_dict ("fc", "classifier.3", ...)
    late_body: str  # the first parameter name of the late body: the second of the three layer groups

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_name)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the head (N, features): everything the network computes before its last layer."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """[early body, late body, head], each in definition order (input to output)."""
        groups: list[list[nn.Parameter]] = [[], [], []]
        at = 0
        for name, p in self.named_parameters():
            if name.startswith(self.late_body):
                at = max(at, 1)
            groups[2 if name.startswith(self.head_name + ".") else at].append(p)
        return groups


def _init(model: nn.Module, linear) -> nn.Module:
    """torchvision's initialization: He-normal (fan-out) convolutions with zero bias, unit norms, and
    `linear(module)` for the fully connected layers."""
    if next(model.parameters()).is_meta:  # built for its shapes only: random draws there import torch._dynamo
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            linear(m)
    return model


# ---------------------------------------------------------------------------------------------------
# ResNet


class Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # the stride here: "v1.5"
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(Backbone):
    head_name, late_body = "fc", "layer3"

    def __init__(self, block, depths: tuple[int, ...], in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks = []
            for b in range(depth):
                blocks.append(block(c_in, width, 2 if i > 0 and b == 0 else 1))
                c_in = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init(self, lambda m: None)  # PyTorch's default for the fully connected layer, as torchvision

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


@register("resnet18_imagenet")
def resnet18_imagenet(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return ResNet(Basic, (2, 2, 2, 2), in_channels, num_classes)


@register("resnet50")
def resnet50(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, num_classes)


# ---------------------------------------------------------------------------------------------------
# The pieces MobileNetV3 and EfficientNet share (torchvision.ops' names, so the keys match)


class ConvNormAct(nn.Sequential):
    """conv, norm, activation as keys .0, .1 (and .2 without parameters); padding keeps the size."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, norm=nn.BatchNorm2d,
                 act=nn.ReLU, bias: bool = False, padding: int | None = None):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2 if padding is None
                                             else padding, groups=groups, bias=bias)]
        if norm is not None:
            layers.append(norm(c_out))
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Pool, 1x1 conv down (fc1), activation, 1x1 conv up (fc2), gate: channel attention."""

    def __init__(self, channels: int, squeeze: int, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = act(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class StochasticDepth(nn.Module):
    """Training drops the whole residual branch of each sample with probability p (rescaling the kept ones);
    evaluation keeps it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)


def divisible(v: float, by: int = 8) -> int:
    """The channel rounding of the MobileNet papers: to a multiple of `by`, never 10% below `v`."""
    out = max(by, int(v + by / 2) // by * by)
    return out + by if out < 0.9 * v else out


class Pooled(Backbone):
    """features -> global average pool -> classifier (MobileNetV3, EfficientNet, ConvNeXt)."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:-1](x)  # all of the classifier but its last linear layer


# ---------------------------------------------------------------------------------------------------
# MobileNetV3-Large


class MobileBlock(nn.Module):
    """Expand (1x1), depthwise (k x k), optional squeeze-excitation, project (1x1, linear); residual."""

    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, act, stride: int, norm):
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(ConvNormAct(c_in, expanded, 1, norm=norm, act=act))
        layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, norm=norm, act=act))
        if se:
            layers.append(SqueezeExcite(expanded, divisible(expanded // 4), gate=nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, c_out, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + x if self.residual else self.block(x)


# (input, kernel, expanded, output, squeeze-excitation, activation, stride): the paper's Table 1
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1))


class MobileNetV3(Pooled):
    head_name, late_body = "classifier.3", "features.7"

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [ConvNormAct(in_channels, 16, 3, 2, norm=norm, act=nn.Hardswish)]
        for c_in, k, expanded, c_out, se, act, stride in MOBILENET_V3_LARGE:
            layers.append(MobileBlock(c_in, k, expanded, c_out, se, nn.ReLU if act == "RE" else nn.Hardswish,
                                      stride, norm))
        layers.append(ConvNormAct(160, 960, 1, norm=norm, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes))

        def linear(m: nn.Linear) -> None:
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        _init(self, linear)


@register("mobilenet_v3_large")
def mobilenet_v3_large(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return MobileNetV3(in_channels, num_classes)


# ---------------------------------------------------------------------------------------------------
# EfficientNet-B0


class MBConv(nn.Module):
    """EfficientNet's block: MobileBlock's shape with SiLU, a sigmoid gate, and stochastic depth."""

    def __init__(self, expand: int, kernel: int, stride: int, c_in: int, c_out: int, drop: float):
        super().__init__()
        expanded = divisible(c_in * expand)
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(ConvNormAct(c_in, expanded, 1, act=nn.SiLU))
        layers += [ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, act=nn.SiLU),
                   SqueezeExcite(expanded, max(1, c_in // 4), act=partial(nn.SiLU, inplace=True)),
                   ConvNormAct(expanded, c_out, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.residual else out


# (expansion, kernel, stride, input, output, blocks) per stage: the paper's Table 1 for B0
EFFICIENTNET_B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                   (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


class EfficientNet(Pooled):
    head_name, late_body = "classifier.1", "features.5"

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2, depth_drop: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [ConvNormAct(in_channels, 32, 3, 2, act=nn.SiLU)]
        total, done = sum(s[-1] for s in EFFICIENTNET_B0), 0
        for expand, k, stride, c_in, c_out, blocks in EFFICIENTNET_B0:
            stage = []
            for b in range(blocks):  # the drop probability rises linearly with the block's depth
                stage.append(MBConv(expand, k, stride if b == 0 else 1, c_in if b == 0 else c_out, c_out,
                                    depth_drop * done / total))
                done += 1
            layers.append(nn.Sequential(*stage))
        layers.append(ConvNormAct(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes))

        def linear(m: nn.Linear) -> None:
            bound = 1.0 / m.out_features ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
        _init(self, linear)


@register("efficientnet_b0")
def efficientnet_b0(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return EfficientNet(in_channels, num_classes)


# ---------------------------------------------------------------------------------------------------
# ConvNeXt-Tiny


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, 4x MLP with GELU (channels last), scaled, stochastic depth; residual."""

    def __init__(self, dim: int, drop: float, layer_scale: float = 1e-6):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute((0, 2, 3, 1)),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute((0, 3, 1, 2)))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))  # a factory: no op on the meta device
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


class ConvNeXt(Pooled):
    head_name, late_body = "classifier.2", "features.4"

    def __init__(self, in_channels: int, num_classes: int, depth_drop: float = 0.1):
        super().__init__()
        norm = partial(LayerNorm2d, eps=1e-6)
        widths, depths = (96, 192, 384, 768), (3, 3, 9, 3)
        layers: list[nn.Module] = [ConvNormAct(in_channels, 96, 4, 4, norm=norm, act=None, bias=True, padding=0)]
        total, done = sum(depths), 0
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            layers.append(nn.Sequential(*(ConvNeXtBlock(width, depth_drop * (done + b) / (total - 1))
                                          for b in range(depth))))
            done += depth
            if i < 3:  # downsampling between stages: norm, then a 2x2 stride-2 convolution
                layers.append(nn.Sequential(norm(width), nn.Conv2d(width, widths[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm(768), nn.Flatten(1), nn.Linear(768, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.is_meta:  # (as _init says)
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[:-1](self.avgpool(self.features(x)))  # LayerNorm2d, then flatten


@register("convnext_tiny")
def convnext_tiny(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    if min(image_size) < 32:  # a stride-4 stem and three stride-2 downsamplings: 1 px at the end from 32 px
        raise CnnlabError(f"convnext_tiny needs images of at least 32x32 pixels, got {image_size[0]}x{image_size[1]}")
    return ConvNeXt(in_channels, num_classes)
