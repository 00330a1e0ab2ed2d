"""CIFAR ResNets of He et al. 2016 (depth 6n+2, option-A shortcuts), as in fb.resnet.torch.

The paper trains ResNet-20 and ResNet-56 with fb.resnet.torch (Table 3). Parameter counts for
10 classes (measured): ResNet-20 269,722 (19 BatchNorm layers); ResNet-56 853,018 (55).
The often-quoted 272,474 and 855,770 are the same nets with 1x1-conv (option B) shortcuts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import cifar10_normalize, conv_bn_relu, init_weights

_STAGE_CHANNELS = (16, 32, 64)  # times `width`; each stage after the first halves H and W


class ShortcutA(nn.Module):
    """Parameter-free shortcut (option A): strided subsampling, then zero channels appended.

    fb.resnet.torch appends the zero channels after the input ones (Concat of identity and
    MulConstant(0)); some PyTorch ports pad both sides instead, which is equivalent up to a
    permutation of channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # pad dim 1 (channels) at the end


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            *conv_bn_relu(in_channels, out_channels, stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = ShortcutA(in_channels, out_channels, stride) if reshape else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """normalize -> conv-BN-ReLU stem -> 3 stages of BasicBlocks -> global avg pool -> Linear."""

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: float):
        super().__init__()
        n = (depth - 2) // 6
        channels = [max(1, round(c * width)) for c in _STAGE_CHANNELS]
        self.normalize = cifar10_normalize(in_channels)
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, channels[0]))
        blocks, c_in = [], channels[0]
        for stage, c in enumerate(channels):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(self.normalize(x)))))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet with 3 stages of (depth - 2) / 6 basic blocks of 16/32/64 channels.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the last Linear.
        in_channels: 3 (RGB) or 1 (grayscale); images in [0, 1].
        width: multiplier of the stage channel counts (rounded, at least 1).

    Returns:
        The model.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth must be 6n + 2 with n >= 1, got {depth}")
    if width <= 0:
        raise ValueError(f"cifar_resnet: width must be positive, got {width}")
    return CifarResNet(depth, num_classes, in_channels, width)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-20 (n = 3), 0.27M parameters. Args as in `cifar_resnet`."""
    return cifar_resnet(20, num_classes, in_channels, width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-56 (n = 9), 0.85M parameters. Args as in `cifar_resnet`."""
    return cifar_resnet(56, num_classes, in_channels, width)
