"""Architecture registry: ``build(arch, num_classes, in_channels, image_size)``.

Every model is a :class:`Classifier`: ``model(x)`` returns logits (B, K) and ``model.features(x)``
the penultimate representation (B, D) that FINE and ``eval --dump-features`` use, with
``model.head(model.features(x)) == model(x)``.

Names:
  wrn-D-W          pre-activation Wide-ResNet (D = 6n+4; WRN-28-4 teacher, WRN-16-2 student in the KD paper)
  resnet20/32/56/110, resnet8x4, resnet32x4
                   CIFAR ResNets of the KD benchmarks (1x1-conv shortcuts)
  preact-resnet18  pre-activation ResNet-18 for 32x32 inputs
  resnet34         ResNet-34 for 32x32 inputs (the FINE paper's network)
  cnn, cnn-W       3-conv network for tiny inputs (W = first width, default 32)
  mlp, mlp-W       2-hidden-layer perceptron (W = hidden width, default 256)
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from kdfine.errors import UsageError


class Classifier(nn.Module):
    """A backbone producing features (B, D) and a linear head to K logits."""

    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) from one pass."""
        f = self.features(x)
        return f, self.head(f)


def _init(module: nn.Module) -> None:
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
        layers, cin = [], stem
        for w, d, s in zip(widths, depths, strides):
            for i in range(d):
                layers.append(PreActBlock(cin, w, s if i == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
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
        layers, cin = [], stem
        for w, d, s in zip(widths, depths, strides):
            for i in range(d):
                layers.append(BasicBlock(cin, w, s if i == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
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


# ------------------------------------------------------------------------------ registry

Builder = Callable[[int, int, int], Classifier]

_FIXED: dict[str, Builder] = {
    "resnet20": lambda k, c, s: ResNet(16, [16, 32, 64], [3, 3, 3], [1, 2, 2], k, c),
    "resnet32": lambda k, c, s: ResNet(16, [16, 32, 64], [5, 5, 5], [1, 2, 2], k, c),
    "resnet56": lambda k, c, s: ResNet(16, [16, 32, 64], [9, 9, 9], [1, 2, 2], k, c),
    "resnet110": lambda k, c, s: ResNet(16, [16, 32, 64], [18, 18, 18], [1, 2, 2], k, c),
    "resnet8x4": lambda k, c, s: ResNet(32, [64, 128, 256], [1, 1, 1], [1, 2, 2], k, c),
    "resnet32x4": lambda k, c, s: ResNet(32, [64, 128, 256], [5, 5, 5], [1, 2, 2], k, c),
    "resnet34": lambda k, c, s: ResNet(64, [64, 128, 256, 512], [3, 4, 6, 3], [1, 2, 2, 2], k, c),
    "preact-resnet18": lambda k, c, s: PreActNet(64, [64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2], k, c),
}

_PATTERNS: list[tuple[str, Callable[..., Classifier]]] = [
    (r"wrn-(\d+)-(\d+)", lambda m, k, c, s: _wrn(int(m[1]), int(m[2]), k, c)),
    (r"cnn(?:-(\d+))?", lambda m, k, c, s: SmallCNN(int(m[1] or 32), k, c)),
    (r"mlp(?:-(\d+))?", lambda m, k, c, s: MLP(int(m[1] or 256), k, c, s)),
]

ARCH_HELP = "wrn-D-W (e.g. wrn-28-4, wrn-16-2), resnet20/32/56/110, resnet8x4, resnet32x4, " \
            "preact-resnet18, resnet34, cnn[-W], mlp[-W]"


def _wrn(depth: int, width: int, k: int, c: int) -> Classifier:
    if (depth - 4) % 6 or depth < 10 or width < 1:
        raise UsageError(f"--arch wrn-{depth}-{width}: depth must be 6n+4 (10, 16, 22, 28, 40, ...) and width >= 1")
    n = (depth - 4) // 6
    return PreActNet(16, [16 * width, 32 * width, 64 * width], [n, n, n], [1, 2, 2], k, c)


def names() -> list[str]:
    """Examples of valid names (the patterned families with their common members)."""
    return sorted(_FIXED) + ["wrn-16-1", "wrn-16-2", "wrn-28-4", "wrn-40-2", "cnn", "mlp"]


def build(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> Classifier:
    """Build ``arch`` for inputs (B, in_channels, image_size, image_size) and ``num_classes`` outputs."""
    name = arch.strip().lower()
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    if name in _FIXED:
        return _FIXED[name](num_classes, in_channels, image_size)
    for pattern, make in _PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            return make(m, num_classes, in_channels, image_size)
    raise UsageError(f"--arch '{arch}': unknown architecture; expected one of {ARCH_HELP}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
