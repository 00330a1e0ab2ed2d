"""Estimated CPU time of a training, from the measured timings in cpu_timings.json (each with its evidence)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from lwat.config import TrainConfig
from lwat.methods import get_method

TIMINGS = Path(__file__).with_name("cpu_timings.json")


@functools.cache
def cpu_timings() -> dict[tuple[str, float], dict]:
    """{(model, width): entry} of cpu_timings.json; an entry has seconds_per_image and its evidence."""
    entries = json.loads(TIMINGS.read_text())["timings"]
    return {(e["model"], e["width"]): e for e in entries}


def estimate_cpu_seconds(cfg: TrainConfig, train_images: int = 50_000, test_images: int = 10_000) -> float | None:
    """Estimated seconds of one training on this project's 2-core CPU machine, or None for an unmeasured model.

    Args:
        cfg: the training (model, width, method, epochs, train_subset).
        train_images: training images without a subset (CIFAR: 50,000).
        test_images: test images, evaluated after every epoch (CIFAR: 10,000).

    Returns:
        epochs x (passes x training images + test images / 3) x the model's seconds per image (cpu_timings.json).
    """
    entry = cpu_timings().get((cfg.model, cfg.width))
    if entry is None:
        return None
    n = cfg.train_subset or train_images
    return cfg.epochs * (get_method(cfg.method).passes * n + test_images / 3) * entry["seconds_per_image"]
