"""The built-in networks for small (CIFAR-sized) inputs, registered in :mod:`kdfine.models`:
pre-activation Wide-ResNets (the KD paper's WRN-28-4 teacher and WRN-16-2 student), the CIFAR
ResNets of the KD benchmarks (1x1-conv shortcuts), preact-ResNet-18 and ResNet-34 for 32x32 inputs
(ResNet-34 is the FINE paper's network), and a small CNN and an MLP for tiny inputs.
``kdfine.models.list_archs()`` lists the names.
"""

from __future__ import annotations

import torch
from torch import nn

from kdfine.errors import UsageError
from kdfine.models import register, register_family
from kdfine.models.base import Classifier


def _init(module: nn.Module) -> None:
    if any(p.is_meta for p in module.parameters()):
        return  # a shape-only skeleton: meta's random draws go through torch._refs, which imports dynamo (2-3 s)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


# ------------------------------------------------------------------------------ pre-activation


def stages(block: type[nn.Module], cin: int, widths: list[int], depths: list[int],
           strides: list[int]) -> tuple[nn.Sequential, int]:
    """The residual stages as one flat Sequential (its indices are the checkpoints' key names):
    per stage ``depth`` blocks of ``width`` channels, the first with the stage's stride. Returns
    it and the output channels."""
    layers = []
    for w, d, s in zip(widths, depths, strides):
        for i in range(d):
            layers.append(block(cin, w, s if i == 0 else 1))
            cin = w
    return nn.Sequential(*layers), cin


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3(cout, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.relu(self.bn2(o)))
        return o + skip


class PreActNet(Classifier):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU, global average pool."""

    def __init__(self, stem: int, widths: list[int], depths: list[int], strides: list[int],
                 num_classes: int, in_channels: int):
        super().__init__()
        self.stem = conv3(in_channels, stem)
        self.blocks, cin = stages(PreActBlock, stem, widths, depths, strides)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.blocks(self.stem(x))))).flatten(1)


# ------------------------------------------------------------------------------ post-activation


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        return self.relu(o + self.shortcut(x))


class ResNet(Classifier):
    def __init__(self, stem: int, widths: list[int], depths: list[int], strides: list[int],
                 num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(conv3(in_channels, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        self.blocks, cin = stages(BasicBlock, stem, widths, depths, strides)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x))).flatten(1)


# ------------------------------------------------------------------------------ small models


class SmallCNN(Classifier):
    """conv-BN-ReLU x3 (widths W, 2W, 4W), one 2x2 max-pool, global average pool."""

    def __init__(self, width: int, num_classes: int, in_channels: int):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(in_channels, width), *block(width, 2 * width), nn.MaxPool2d(2),
                                  *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.feature_dim = 4 * width
        self.head = nn.Linear(4 * width, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


class MLP(Classifier):
    """Flatten, Linear-BN-ReLU to W, Linear-BN-ReLU to W/2."""

    def __init__(self, width: int, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        d = in_channels * image_size * image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                  nn.Linear(width, width // 2), nn.BatchNorm1d(width // 2), nn.ReLU(inplace=True))
        self.feature_dim = width // 2
        self.head = nn.Linear(width // 2, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ------------------------------------------------------------------------------ registrations

_CIFAR = dict(stem=16, widths=[16, 32, 64], strides=[1, 2, 2])
_X4 = dict(stem=32, widths=[64, 128, 256], strides=[1, 2, 2])
_IMAGENET = dict(stem=64, widths=[64, 128, 256, 512], strides=[1, 2, 2, 2])


def _resnet(name: str, depths: list[int], **shape) -> None:
    register(name)(lambda k, c, s: ResNet(depths=depths, num_classes=k, in_channels=c, **shape))


for _name, _n in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("resnet110", 18)):
    _resnet(_name, [_n] * 3, **_CIFAR)
_resnet("resnet8x4", [1, 1, 1], **_X4)
_resnet("resnet32x4", [5, 5, 5], **_X4)
_resnet("resnet34", [3, 4, 6, 3], **_IMAGENET)


@register("preact-resnet18")
def preact_resnet18(k: int, c: int, s: int) -> Classifier:
    return PreActNet(depths=[2, 2, 2, 2], num_classes=k, in_channels=c, **_IMAGENET)


@register_family("wrn-D-W", r"wrn-(\d+)-(\d+)", ("wrn-16-1", "wrn-16-2", "wrn-28-4", "wrn-40-2"))
def wrn(groups: tuple, k: int, c: int, s: int) -> Classifier:
    """Wide-ResNet of depth D = 6n+4 (>= 10) and width W >= 1."""
    depth, width = int(groups[0]), int(groups[1])
    if (depth - 4) % 6 or depth < 10 or width < 1:
        raise UsageError(f"--arch wrn-{depth}-{width}: depth must be 6n+4 (10, 16, 22, 28, 40, ...) and width >= 1")
    n = (depth - 4) // 6
    return PreActNet(16, [16 * width, 32 * width, 64 * width], [n, n, n], [1, 2, 2], k, c)


def _width(family: str, groups: tuple, default: int, minimum: int) -> int:
    width = int(groups[0]) if groups[0] else default
    if width < minimum:
        raise UsageError(f"--arch {family}-{groups[0]}: the width must be >= {minimum}")
    return width


@register_family("cnn[-W]", r"cnn(?:-(\d+))?", ("cnn",))
def cnn(groups: tuple, k: int, c: int, s: int) -> Classifier:
    """SmallCNN of first width W (default 32, >= 1)."""
    return SmallCNN(_width("cnn", groups, 32, 1), k, c)


@register_family("mlp[-W]", r"mlp(?:-(\d+))?", ("mlp",))
def mlp(groups: tuple, k: int, c: int, s: int) -> Classifier:
    """MLP of hidden width W (default 256, >= 2: the second layer has W/2 units)."""
    return MLP(_width("mlp", groups, 256, 2), k, c, s)
