"""The toy tanh MLP of the paper's Section 3.4 (grayscale CIFAR-10, Figure 2, Table 2).

Parameter count for 10 classes, 1x32x32 input (measured): 1,579,530.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import cifar10_normalize


class MLP(nn.Module):
    """normalize -> flatten -> (Linear -> Tanh) per hidden layer -> Linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: Sequence[int]):
        super().__init__()
        self.normalize = cifar10_normalize(in_channels)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x))


def mlp_tanh(num_classes: int = 10, in_channels: int = 1, image_size: int = 32,
             hidden: Sequence[int] = (1024, 512), in_features: int | None = None) -> MLP:
    """Two tanh hidden layers of 1024 and 512 units on flattened grayscale images in [0, 1].

    Args:
        num_classes: outputs of the last Linear.
        in_channels: 1 (grayscale, the paper's setting) or 3.
        image_size: H = W of the input images (32 for CIFAR, 8 for sklearn digits).
        hidden: sizes of the hidden layers.
        in_features: optional check; must equal in_channels * image_size ** 2, from which the
            input width is always derived.

    Returns:
        The model; it takes (N, in_channels, image_size, image_size) images.
    """
    expected = in_channels * image_size * image_size
    if in_features is not None and in_features != expected:
        raise ValueError(f"mlp_tanh: in_features={in_features} disagrees with in_channels * "
                         f"image_size**2 = {expected}; set image_size instead")
    return MLP(num_classes, in_channels, image_size, tuple(hidden))
