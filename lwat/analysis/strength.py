"""Table 1: how adversarial are previous-batch layerwise perturbations compared with FGSM at the input?

For each eps, the accuracy of one trained model on the test set under four perturbations:
  fgsm        FGSM at the input (Goodfellow et al. 2015), eps in pixel units;
  layerwise   every perturbation point moved by eps * sign(gradient cached from the previous test batch)
              (paper Section 3.3), eps in the points' activation units (fixed scale, no (M - m) factor);
  input_prev  control: the previous batch's gradient signs at the input only, eps in pixel units;
  input_random control: random signs of the same size at the input only (the paper implies them: previous-batch
              signs at the input are "not adversarial enough"), eps in pixel units; like input_prev, the first
              batch is clean and each later batch takes signs drawn after the one before;
  random      control: random signs of the same magnitude eps at every point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lwat.analysis import _plot
from lwat.evaluate import accuracy, layerwise_attack_accuracy
from lwat.rundir import load_one

# row key -> legend text
KINDS = {
    "fgsm": "FGSM at the input",
    "layerwise": "previous-batch signs, every point",
    "input_prev": "previous-batch signs, input only",
    "input_random": "random signs, input only",
    "random": "random signs, every point",
}


def compute(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float] = (0, .05, .1, .15, .2),
            batch_size: int = 100, *, points: list[str] | None = None, seed: int = 0,
            kinds: Sequence[str] = tuple(KINDS)) -> dict:
    """Accuracy under each perturbation kind for each eps (paper Table 1).

    Args:
        model: trained classifier taking images in [0, 1].
        x, y: test images (uint8 or float in [0, 1]) and labels, fed in this order.
        eps_list: perturbation strengths (see the module docstring for their units).
        batch_size: test batch size (the previous-batch cache is one batch).
        points: perturbation points; default `lwat.default_points(model)`.
        seed: seeds the random-sign controls.
        kinds: the perturbations measured (keys of KINDS); default all.

    Returns:
        {"eps": [float], "accuracy": {kind: [fraction per eps]}, "labels": KINDS}.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    measures = {  # kind -> accuracy at eps e
        "fgsm": lambda e: accuracy(model, x, y, attack="fgsm", eps=e, batch_size=batch_size),
        "layerwise": lambda e: layerwise_attack_accuracy(model, x, y, e, points=points, batch_size=batch_size),
        "input_prev": lambda e: layerwise_attack_accuracy(model, x, y, e, input_only=True, batch_size=batch_size),
        "input_random": lambda e: layerwise_attack_accuracy(model, x, y, e, input_only=True, direction="random",
                                                            seed=seed, batch_size=batch_size),
        "random": lambda e: layerwise_attack_accuracy(model, x, y, e, points=points, direction="random", seed=seed,
                                                      batch_size=batch_size),
    }
    eps = [float(e) for e in eps_list]
    acc = {k: [measures[k](e) for e in eps] for k in KINDS if k in kinds}
    return {"eps": eps, "accuracy": acc, "labels": {k: KINDS[k] for k in acc}}


NEEDS = "model"  # one trained model and its test set
VERSION = 2  # 2: the input_random control added


def from_runs(runs: list, *, test, device="cpu", **options) -> dict:
    """`compute` on the model of one run (`lwat.analysis.runs` dispatches here)."""
    return compute(load_one(runs, "strength", device), *test, **options)


def to_rows(result: dict) -> list[dict]:
    """One row per (kind, eps): {"kind", "eps", "accuracy"} with accuracy a fraction."""
    return [{"kind": k, "eps": e, "accuracy": a}
            for k, values in result["accuracy"].items() for e, a in zip(result["eps"], values)]


def plot(result: dict, path) -> None:
    """Accuracy (%) against eps, one line per perturbation kind; written as a PNG to `path`."""
    _plot.accuracy_lines(result, path, labels=result.get("labels", KINDS),
                         xlabel="eps (pixel units at the input, activation units at hidden points)",
                         ylabel="test accuracy (%)",
                         title="Previous-batch layerwise perturbations vs FGSM\n(paper Table 1)")
