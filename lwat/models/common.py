"""Pieces shared by the model files: input normalization, conv-BN-ReLU, weight init."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# CIFAR-10 training-set per-channel statistics of pixels in [0, 1] (the usual published values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Grayscale equivalents, an approximation: gray = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601
# luminance), so the gray mean is exactly this weighted sum of the channel means (0.4809). The
# same weighted sum of the stds (0.2466) is the std only if the channels were perfectly
# correlated, so it is an upper bound; the measured gray std of CIFAR-10 is about 0.24, close
# enough for a preprocessing constant.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
CIFAR10_GRAY_MEAN = (sum(w * m for w, m in zip(LUMA_WEIGHTS, CIFAR10_MEAN)),)
CIFAR10_GRAY_STD = (sum(w * s for w, s in zip(LUMA_WEIGHTS, CIFAR10_STD)),)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std for images in [0, 1], the first layer of every model.

    Keeping normalization inside the model lets attacks and eps work in pixel units (8/255).
    The statistics are non-persistent buffers: they follow `.to(device)` but stay out of the
    state_dict, whose keys are then only real weights and BatchNorm running statistics.

    Args:
        mean: one value per channel, in pixel units.
        std: one positive value per channel, in pixel units.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {tuple(std)}")
        # Shape (1, C, 1, 1) broadcasts over a (N, C, H, W) batch.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4f}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4f}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def cifar10_normalize(in_channels: int) -> Normalize:
    """Normalize with the CIFAR-10 statistics for RGB (3 channels) or grayscale (1 channel) input.

    Args:
        in_channels: 3 or 1.

    Returns:
        A Normalize module.
    """
    if in_channels == 3:
        return Normalize(CIFAR10_MEAN, CIFAR10_STD)
    if in_channels == 1:
        return Normalize(CIFAR10_GRAY_MEAN, CIFAR10_GRAY_STD)
    raise ValueError(f"no default normalization statistics for in_channels={in_channels}; use 1 or 3")


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False,
                 bn_eps: float = 1e-5) -> list[nn.Module]:
    """conv3x3 (padding 1) -> BatchNorm2d -> ReLU, as a list to splice into a flat nn.Sequential.

    The ReLU is not in-place, so the BatchNorm output stays a tensor of its own: a perturbation
    point (lwat.attach) adds eps_l * r_l to it in its forward and reads its gradient in backward.
    """
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias),
        nn.BatchNorm2d(out_channels, eps=bn_eps),
        nn.ReLU(),
    ]


def init_weights(model: nn.Module) -> None:
    """He init of the reference CIFAR implementations (cifar.torch, fb.resnet.torch, WRN).

    Convs: normal with std sqrt(2 / (k * k * out_channels)); BatchNorm: weight 1, bias 0;
    Linear: PyTorch's default weight, bias 0.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
