"""What a TrainConfig names, made: its model (with the lwat handle its method needs) and its data.

The trainer (`lwat.train`) builds a run from these, and `lwat.rundir` rebuilds a trained one; neither imports the other.
"""

from __future__ import annotations

import lwat
from lwat.config import TrainConfig
from lwat.data import load_dataset
from lwat.methods import get_method
from lwat.models import build_model, model_options


def build(cfg: TrainConfig, num_classes: int, image_shape: tuple[int, int, int]):
    """The model of `cfg` (fresh weights from the global RNG) and its lwat handle (None for input-space methods).

    Args:
        cfg: the run's config (model, width, dropout; method, eps, scale, depth, kernels for the handle).
        num_classes: outputs of the classifier.
        image_shape: (C, H, W) of the images.

    Returns:
        (model, handle): the model on the CPU in train mode, and `lwat.attach`'s handle or None.
    """
    method = get_method(cfg.method)
    accepted = model_options(cfg.model)
    options = {"in_channels": image_shape[0]}
    if "image_size" in accepted:
        options["image_size"] = image_shape[1]
    if cfg.width != 1.0:
        options["width"] = cfg.width
    if cfg.dropout or "dropout" in accepted:
        options["dropout"] = cfg.dropout
    model = build_model(cfg.model, num_classes, **options)
    handle = None
    if method.layerwise:
        handle = lwat.attach(model, cfg.eps, scale=cfg.scale, depth=cfg.depth, direction=method.direction,
                             kernels=cfg.kernels)
    return model, handle


def load_data(cfg: TrainConfig):
    """The data set of `cfg` (`lwat.data.load_dataset` with its data_dir, download, grayscale, train_subset,
    val_size and seed): a `lwat.data.Dataset`, uint8 images on the CPU."""
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, grayscale=cfg.grayscale,
                        train_subset=cfg.train_subset, val_size=cfg.val_size, seed=cfg.seed)
