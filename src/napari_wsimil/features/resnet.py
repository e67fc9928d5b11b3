"""ResNet-18/50 in plain torch, with torchvision's parameter names.

torchvision does not import beside every torch build, yet users hold ImageNet (or histology) weight
files saved from it. Writing the few classes here with the *same attribute names* (``conv1``,
``layer1.0.bn1``, ``layer1.0.downsample.0`` ...) lets those files load with strict key checking and
no conversion. ``resnet50-trunc`` is CLAM's default encoder: ResNet-50 cut after ``layer3`` plus a
global average pool, a 1024-d feature.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and a skip (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + skip)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided, as torchvision ≥ 0.6 "ResNet v1.5") → 1×1 and a skip (ResNet-50)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + skip)


class ResNet(nn.Module):
    """torchvision's ResNet layout; ``stages`` < 4 drops the later stages (and ``fc``) for truncated trunks.

    ``forward`` returns the pooled feature (B, :attr:`out_dim`), not class logits: the encoders use the
    trunk. ``logits`` applies ``fc`` where the model has one (used to check imported weights).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], stages: int = 4,
                 num_classes: int = 1000):
        super().__init__()
        if not 1 <= stages <= 4:
            raise ValueError(f"stages must be 1..4, got {stages}")
        self.stages = stages
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i in range(stages):
            width = 64 * 2**i
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != width * block.expansion:
                downsample = nn.Sequential(_conv1x1(cin, width * block.expansion, stride),
                                           nn.BatchNorm2d(width * block.expansion))
            blocks: list[nn.Module] = [block(cin, width, stride, downsample)]
            cin = width * block.expansion
            blocks += [block(cin, width) for _ in range(1, layers[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = cin
        self.fc: nn.Linear | None = nn.Linear(cin, num_classes) if stages == 4 else None
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation, so random-weight baselines behave like theirs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise ValueError("this truncated ResNet has no classification head")
        return self.fc(self.forward(x))

    def ignorable_keys(self) -> tuple[str, ...]:
        """Key prefixes of a full torchvision file that a truncated trunk may drop without complaint."""
        return tuple(f"layer{i + 1}." for i in range(self.stages, 4)) + (("fc.",) if self.fc is None else ())


def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3])


def resnet50_trunc() -> ResNet:
    """CLAM's encoder: ResNet-50 up to ``layer3``, global average pool → 1024-d."""
    return ResNet(Bottleneck, [3, 4, 6, 3], stages=3)


__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet50", "resnet50_trunc"]
