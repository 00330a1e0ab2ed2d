"""Model registry: build any model of the paper by name with `build_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from .common import Normalize, cifar10_normalize
from .mlp import mlp_tanh
from .resnet import cifar_resnet, resnet20, resnet56
from .vgg import VGG16_POOL_BN_DEPTHS, vgg16_bn, vgg_pool_depths
from .vit import vit
from .wrn import wrn, wrn16_4, wrn28_10, wrn40_10

# Every builder takes num_classes and in_channels (3 = RGB, 1 = grayscale) and returns a model
# for images in [0, 1] that normalizes them itself.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp_tanh": mlp_tanh,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16_bn": vgg16_bn,
    "vit": vit,
    "wrn": wrn,
    "wrn16_4": wrn16_4,
    "wrn28_10": wrn28_10,
    "wrn40_10": wrn40_10,
}


def list_models() -> list[str]:
    """Names accepted by `build_model`, sorted."""
    return sorted(MODELS)


def model_options(name: str) -> list[str]:
    """The options `build_model(name, ...)` accepts besides num_classes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return [p for p in inspect.signature(MODELS[name]).parameters if p != "num_classes"]


def build_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model.

    Args:
        name: a key of MODELS, e.g. "resnet20".
        num_classes: outputs of the classifier.
        **options: keyword arguments of that model's builder (in_channels, dropout, width, ...).

    Returns:
        A freshly initialized model on the CPU.

    Raises:
        ValueError: unknown name, or an option the builder does not take.
    """
    accepted = model_options(name)  # checked first, so a TypeError inside a builder is never masked
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} got unknown option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted)}")
    return MODELS[name](num_classes=num_classes, **options)


__all__ = [
    "MODELS", "build_model", "list_models", "model_options",
    "Normalize", "cifar10_normalize",
    "mlp_tanh", "cifar_resnet", "resnet20", "resnet56",
    "vgg16_bn", "vgg_pool_depths", "VGG16_POOL_BN_DEPTHS",
    "vit",
    "wrn", "wrn16_4", "wrn28_10", "wrn40_10",
]
