"""Figure 2: average singular value spectrum of the Jacobian of each network's encoder over test images.

The encoder is the model up to its last nn.Linear (the classifier): its output is that layer's input,
e.g. the 512 tanh units of the toy MLP (paper Section 3.4). It is found generically, with a forward
pre-hook on the last nn.Linear in `named_modules()` order, so any model works, not only nn.Sequential;
the classifier's own output is computed and discarded. Jacobians are taken per image with
torch.func (vmap over jacrev), in eval mode, batch by batch; only their singular values are kept.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lwat.analysis import _plot
from lwat.attacks import eval_mode
from lwat.evaluate import batches, last_linear, model_device
from lwat.rundir import load_run


def jacobians(model: nn.Module, x: torch.Tensor, *, batch_size: int = 64):
    """Yields the encoder Jacobians d(features)/d(image), one batch at a time.

    Args:
        model: classifier with a last nn.Linear; run in eval mode (modes restored after).
        x: uint8 (N, C, H, W) or float images in [0, 1].
        batch_size: images per vmap call (memory: batch * F * C*H*W floats).

    Yields:
        float (B, F, C*H*W) Jacobians, F = in_features of the last Linear, pixels flattened (C, H, W)-major.
    """
    captured: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_pre_hook(lambda m, args: captured.append(args[0]))

    def encoder(image):  # (C, H, W) -> (F,)
        captured.clear()
        model(image.unsqueeze(0))
        return captured[-1].reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(encoder))
    try:
        with eval_mode(model), torch.no_grad():  # jacrev ignores the outer no_grad; parameters record nothing
            for xb, _ in batches(x, None, batch_size, model_device(model)):
                j = jac(xb)  # (B, F, C, H, W)
                yield j.reshape(len(xb), j.shape[1], -1)
    finally:
        hook.remove()


def compute(models: dict[str, nn.Module], x: torch.Tensor, top: int = 50, batch_size: int = 64) -> dict:
    """Mean (and std) over images of the top singular values of each encoder's Jacobian (paper Figure 2).

    Args:
        models: {name: trained model}.
        x: test images, uint8 (N, C, H, W) or float in [0, 1].
        top: number of leading singular values kept (at most min(F, C*H*W)).
        batch_size: images per Jacobian batch.

    Returns:
        {"index": int array (k,) 1..k, "mean": {name: (k,) array}, "std": {name: (k,) array}, "n": N}.
    """
    if not models:
        raise ValueError("models is empty")
    mean, std = {}, {}
    for name, model in models.items():
        values = torch.cat([torch.linalg.svdvals(j).cpu() for j in jacobians(model, x, batch_size=batch_size)])
        values = values[:, :top].double()  # svdvals are sorted descending
        mean[name] = values.mean(0).numpy()
        std[name] = values.std(0, correction=0).numpy()
    k = min(len(v) for v in mean.values())
    return {"index": np.arange(1, k + 1), "mean": {n: v[:k] for n, v in mean.items()},
            "std": {n: v[:k] for n, v in std.items()}, "n": len(x)}


NEEDS = "model"  # the trained models and their test images


def from_runs(runs: list, *, test, device="cpu", **options) -> dict:
    """`compute` on the models of the runs, named by their labels (`lwat.analysis.runs` dispatches here)."""
    return compute({label: load_run(run.dir, device)[0] for label, run in runs}, test[0], **options)


def to_rows(result: dict) -> list[dict]:
    """One row per (model, index): {"model", "index", "mean", "std"} of the singular value."""
    return [{"model": name, "index": int(i), "mean": float(m), "std": float(s)}
            for name in result["mean"]
            for i, m, s in zip(result["index"], result["mean"][name], result["std"][name])]


def plot(result: dict, path) -> None:
    """Mean singular value (log scale) against its rank, one line per model; written as a PNG to `path`."""
    fig, axes = _plot.figure(panel=(6.0, 4.2))
    ax = axes[0, 0]
    for name, values in result["mean"].items():
        ax.plot(result["index"], values, marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("singular value rank (1 = largest)")
    ax.set_ylabel("mean singular value (feature units per pixel unit)")
    ax.set_title(f"Encoder Jacobian singular values\n(mean over {result['n']} images, paper Figure 2)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _plot.save(fig, path)
