"""VGG-16 with BatchNorm for CIFAR, as in szagoruyko's cifar.torch (models/vgg_bn_drop.lua).

This is the VGG the paper uses (Tables 3-6). Parameter counts for 10 classes (measured):
width 1.0: 14,991,946; width 0.5: 3,753,258; width 0.25: 940,954.
"""

from __future__ import annotations

from torch import nn

from .common import cifar10_normalize, conv_bn_relu, init_weights

# Output channels of the 13 conv blocks, "M" = 2x2 max pool (pool1..pool5).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# Number of BatchNorm layers before pool1..pool5 (counted from VGG16_CFG); the paper's Table 6
# perturbs "conv1 to poolk", i.e. the first VGG16_POOL_BN_DEPTHS[k - 1] BatchNorm outputs.
VGG16_POOL_BN_DEPTHS = tuple(
    sum(v != "M" for v in VGG16_CFG[:i]) for i, c in enumerate(VGG16_CFG) if c == "M"
)  # (2, 4, 7, 10, 13)

# cifar.torch dropout probabilities: 0.3 after the first conv block, 0.4 after every other
# block that is not the last of its stage, 0.5 before each Linear.
_DROP_FIRST, _DROP_CONV, _DROP_FC = 0.3, 0.4, 0.5

# cifar.torch builds SpatialBatchNormalization(n, 1e-3) for conv blocks; BatchNorm1d keeps 1e-5.
_BN_EPS = 1e-3


class VGG(nn.Module):
    """normalize -> features (conv blocks and pools) -> classifier; see `vgg16_bn`."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, in_channels: int):
        super().__init__()
        # Registered first so named_modules() order is execution order.
        self.normalize = cifar10_normalize(in_channels)
        self.features = features
        self.classifier = classifier
        init_weights(self)

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))


def vgg16_bn(num_classes: int = 10, dropout: bool = False, width: float = 1.0,
             in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm after every conv, for 32x32 images in [0, 1].

    Args:
        num_classes: outputs of the last Linear.
        dropout: cifar.torch's dropout layers (Table 5 compares with and without); off by default, as
            TrainConfig.dropout.
        width: multiplier of every channel count (rounded, at least 1); 0.25 makes a fast test model.
        in_channels: 3 (RGB) or 1 (grayscale).

    Returns:
        The model; its features are one flat nn.Sequential (13 conv-BN-ReLU blocks, 5 pools).
    """
    if not isinstance(dropout, bool):
        raise TypeError(f"vgg16_bn: dropout is on/off here, expected bool, got {dropout!r}")
    if width <= 0:
        raise ValueError(f"vgg16_bn: width must be positive, got {width}")

    def scaled(c: int) -> int:
        return max(1, round(c * width))

    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c in enumerate(VGG16_CFG):
        if c == "M":
            # ceil_mode as in cifar.torch; it also lets images smaller than 32x32 through.
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            continue
        # cifar.torch keeps the (redundant before BN) conv bias; kept for the same parameter count.
        layers += conv_bn_relu(c_in, scaled(c), bias=True, bn_eps=_BN_EPS)
        c_in = scaled(c)
        last_of_stage = VGG16_CFG[i + 1] == "M"
        if dropout and not last_of_stage:
            layers.append(nn.Dropout(_DROP_FIRST if i == 0 else _DROP_CONV))
    layers.append(nn.Flatten())

    hidden = scaled(512)
    classifier = nn.Sequential(
        *([nn.Dropout(_DROP_FC)] if dropout else []),
        nn.Linear(c_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        *([nn.Dropout(_DROP_FC)] if dropout else []),
        nn.Linear(hidden, num_classes),
    )
    return VGG(nn.Sequential(*layers), classifier, in_channels)


def vgg_pool_depths(model: VGG) -> list[int]:
    """Number of BatchNorm layers executed before each max pool of `model.features`.

    Args:
        model: a model built by `vgg16_bn`.

    Returns:
        One count per pool, [2, 4, 7, 10, 13] for VGG-16 (Table 6: "conv1 to pool1..pool5").
    """
    depths, n_bn = [], 0
    for m in model.features:
        if isinstance(m, nn.BatchNorm2d):
            n_bn += 1
        elif isinstance(m, nn.MaxPool2d):
            depths.append(n_bn)
    return depths
