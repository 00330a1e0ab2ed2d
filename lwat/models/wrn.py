"""Wide residual networks of Zagoruyko & Komodakis 2016 (pre-activation blocks), for CIFAR.

Used in the paper's appendix, Table 7. Parameter counts for 10 classes (measured):
WRN-28-10 36,479,194 (Table 7: 36.5M); WRN-40-10 55,841,754 (Table 7 prints 51.0M; the WRN
paper has 55.8M for this architecture); WRN-16-4 2,748,890.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import cifar10_normalize, init_weights

_STAGE_CHANNELS = (16, 32, 64)  # times widen_factor; the stem has 16 channels


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus shortcut.

    When the shape changes, the shortcut is a 1x1 conv applied to the same BN-ReLU output as
    the residual branch (as in the reference implementation); otherwise it is the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()  # not in-place: the BatchNorm output is a perturbation point (lwat.attach)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if reshape else None)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(a)))))
        return out + shortcut


class WideResNet(nn.Module):
    """normalize -> conv3x3 stem -> 3 stages of PreActBlocks -> BN-ReLU -> avg pool -> Linear."""

    def __init__(self, depth: int, widen_factor: int, dropout: float, num_classes: int,
                 in_channels: int):
        super().__init__()
        n = (depth - 4) // 6
        self.normalize = cifar10_normalize(in_channels)
        self.stem = nn.Conv2d(in_channels, _STAGE_CHANNELS[0], 3, padding=1, bias=False)
        blocks, c_in = [], _STAGE_CHANNELS[0]
        for stage, c in enumerate(_STAGE_CHANNELS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, c * widen_factor, stride, dropout))
                c_in = c * widen_factor
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(self.normalize(x)))))


def wrn(depth: int = 28, widen_factor: int = 10, dropout: float | bool = 0.0, num_classes: int = 10,
        in_channels: int = 3) -> WideResNet:
    """WRN-depth-widen_factor: 3 stages of (depth - 4) / 6 blocks of 16k/32k/64k channels.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...).
        widen_factor: k, the channel multiplier.
        dropout: probability between the two convs of each block (0.3 in the WRN paper's
            "with dropout" rows of Table 7; 0 disables it). True means 0.3, False 0.
        num_classes: outputs of the last Linear.
        in_channels: 3 (RGB) or 1 (grayscale); images in [0, 1].

    Returns:
        The model.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wrn: depth must be 6n + 4 with n >= 1, got {depth}")
    if not isinstance(widen_factor, int) or widen_factor < 1:
        raise ValueError(f"wrn: widen_factor must be a positive int, got {widen_factor!r}")
    if isinstance(dropout, bool):  # the on/off switch shared with vgg16_bn
        dropout = 0.3 if dropout else 0.0
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"wrn: dropout is a probability in [0, 1), got {dropout!r}")
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float | bool = 0.0) -> WideResNet:
    """WRN-28-10, 36.5M parameters. Args as in `wrn`."""
    return wrn(28, 10, dropout, num_classes, in_channels)


def wrn40_10(num_classes: int = 10, in_channels: int = 3, dropout: float | bool = 0.0) -> WideResNet:
    """WRN-40-10, 55.8M parameters. Args as in `wrn`."""
    return wrn(40, 10, dropout, num_classes, in_channels)


def wrn16_4(num_classes: int = 10, in_channels: int = 3, dropout: float | bool = 0.0) -> WideResNet:
    """WRN-16-4, 2.7M parameters. Args as in `wrn`."""
    return wrn(16, 4, dropout, num_classes, in_channels)
