"""Table 2: how well do FGSM images crafted on one network fool another (the "degree of adversarialness")?

Each test image is perturbed with FGSM computed on each source network (e.g. baseline, FGSM-trained,
layerwise-trained) and every perturbed image is classified by one target network (the baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lwat.analysis import _plot
from lwat.evaluate import accuracy
from lwat.rundir import load_run


def compute(source_models: dict[str, nn.Module], target_model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            eps_list: Sequence[float] = (0, .02, .04, .06, .08, .1), batch_size: int = 500) -> dict:
    """Accuracy of `target_model` on FGSM images crafted on each source (paper Table 2).

    Args:
        source_models: {name: model} on which the FGSM images are crafted.
        target_model: the model that classifies them.
        x, y: test images (uint8 or float in [0, 1]) and labels.
        eps_list: FGSM radii in pixel units; 0 is the clean accuracy (the same for every source).
        batch_size: images per batch.

    Returns:
        {"eps": [float], "accuracy": {source name: [fraction per eps]}}.
    """
    if not source_models:
        raise ValueError("source_models is empty")
    acc = {name: [accuracy(target_model, x, y, attack="fgsm", eps=float(e), source=src, batch_size=batch_size)
                  for e in eps_list]
           for name, src in source_models.items()}
    return {"eps": [float(e) for e in eps_list], "accuracy": acc}


NEEDS = "model"  # the trained models and their test set


def from_runs(runs: list, *, test, device="cpu", target=None, **options) -> dict:
    """`compute` with the runs' models as sources and `target`'s as the classifier (`lwat.analysis.runs`)."""
    if target is None:
        raise ValueError("analyze transfer: give --target RUN (the model that classifies)")
    sources = {label: load_run(run.dir, device)[0] for label, run in runs}
    return compute(sources, load_run(target.dir, device)[0], *test, **options)


def to_rows(result: dict) -> list[dict]:
    """One row per (source, eps): {"source", "eps", "accuracy"} with accuracy a fraction."""
    return [{"source": s, "eps": e, "accuracy": a}
            for s, values in result["accuracy"].items() for e, a in zip(result["eps"], values)]


def plot(result: dict, path) -> None:
    """Target accuracy (%) against FGSM eps, one line per source network; written as a PNG to `path`."""
    _plot.accuracy_lines(result, path, labels={s: f"FGSM crafted on {s}" for s in result["accuracy"]},
                         xlabel="FGSM eps (pixel units, images in [0, 1])", ylabel="target network accuracy (%)",
                         title="FGSM images crafted on each source, classified by the target\n(paper Table 2)")
