"""Figure 1: t-SNE of the penultimate features of two classes under adversarial vs random layerwise perturbations.

Adversarial: the previous-batch layerwise perturbation of Section 3.3 (eps * sign of the gradient cached
from the previous test batch at every point, fixed scale), streamed over all of `x` in order so that the
previous batch holds other classes, as in the paper; the two classes are picked out afterwards.
Random: zero-mean, unit-std Gaussian noise times eps added at every point ("random perturbations with zero
mean and unit standard deviation, applied layerwise"). eps is in the points' activation units.
Features are the input of the last nn.Linear; each (kind, eps) gets its own 2-D t-SNE embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lwat.analysis import _plot
from lwat.attacks import eval_mode
from lwat.evaluate import batches, last_linear_inputs, layerwise_attack_outputs, model_device
from lwat.perturb import default_points
from lwat.rundir import load_one

KINDS = ("adversarial", "random")


def compute(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: tuple[int, int] = (0, 1),
            eps_list: Sequence[float] = (0, .05, .1, .15, .2), n_per_class: int = 200, seed: int = 0, *,
            batch_size: int = 100, points: list[str] | None = None, perplexity: float = 30.0) -> dict:
    """Embeddings and accuracies of two classes under both perturbation kinds, per eps (paper Figure 1).

    Args:
        model: trained classifier taking images in [0, 1].
        x, y: test images (uint8 or float in [0, 1]) and labels; the adversarial pass streams all of them.
        classes: the two classes shown.
        eps_list: perturbation strengths in activation units.
        n_per_class: images per class shown (the first ones in order).
        seed: seeds the Gaussian noise and t-SNE.
        batch_size: test batch size.
        points: perturbation points; default `lwat.default_points(model)`.
        perplexity: t-SNE perplexity (lowered to (n - 1) / 3 for few points).

    Returns:
        {"classes", "eps": [float], "labels": int array (n,), "embedding": {kind: [(n, 2) array per eps]},
         "accuracy": {kind: [fraction per eps]}}; accuracy is 10-way top-1 on the n shown images.
    """
    from sklearn.manifold import TSNE

    if len(set(classes)) != 2:
        raise ValueError(f"tsne: give two different classes, got {tuple(classes)}")
    y_cpu = y.cpu()
    picked = [torch.nonzero(y_cpu == c).flatten()[:n_per_class] for c in classes]
    if any(len(p) < 2 for p in picked):
        raise ValueError(f"need at least 2 test images of each class {classes}")
    idx = torch.cat(picked).sort().values
    labels = y_cpu[idx]
    names = default_points(model) if points is None else list(points)
    result = {"classes": tuple(classes), "eps": [float(e) for e in eps_list], "labels": labels.numpy(),
              "embedding": {k: [] for k in KINDS}, "accuracy": {k: [] for k in KINDS}}
    for e in result["eps"]:
        out = layerwise_attack_outputs(model, x, y, e, batch_size=batch_size, points=names, features=True)
        adversarial = (out["features"][idx], out["pred"][idx])
        random = _gaussian_outputs(model, x[idx.to(x.device)], e, names, batch_size, seed)
        for kind, (feats, pred) in zip(KINDS, (adversarial, random)):
            tsne = TSNE(2, perplexity=min(perplexity, (len(idx) - 1) / 3), init="pca", random_state=seed)
            result["embedding"][kind].append(tsne.fit_transform(feats.double().numpy()))
            result["accuracy"][kind].append((pred == labels).sum().item() / len(labels))
    return result


def _gaussian_outputs(model, x, eps, names, batch_size, seed):
    # Forward hooks add eps * N(0, 1) noise to every point's output; returns (features, predictions) on the CPU.
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"no module named {', '.join(map(repr, unknown))} in the model")

    def noise(module, args, out):
        return out + eps * torch.randn(out.shape, generator=g).to(out)

    hooks = [modules[n].register_forward_hook(noise) for n in names]
    preds = []
    try:
        with eval_mode(model), torch.no_grad(), last_linear_inputs(model, True) as feats:
            for xb, _ in batches(x, None, batch_size, model_device(model)):
                preds.append(model(xb).argmax(1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats), torch.cat(preds)


NEEDS = "model"  # one trained model and its test set


def from_runs(runs: list, *, test, device="cpu", **options) -> dict:
    """`compute` on the model of one run (`lwat.analysis.runs` dispatches here)."""
    return compute(load_one(runs, "tsne", device), *test, **options)


def summary_rows(result: dict) -> list[dict]:
    """The accuracies alone, one row per (kind, eps): what a report keeps (the coordinates are in the plot)."""
    return [{"kind": k, "eps": e, "accuracy": a}
            for k in KINDS for e, a in zip(result["eps"], result["accuracy"][k])]


def to_rows(result: dict) -> list[dict]:
    """One row per (kind, eps, image): {"kind", "eps", "image", "label", "x", "y", "accuracy"}."""
    rows = []
    for kind in KINDS:
        for e, emb, acc in zip(result["eps"], result["embedding"][kind], result["accuracy"][kind]):
            rows += [{"kind": kind, "eps": e, "image": i, "label": int(lab), "x": float(p[0]), "y": float(p[1]),
                      "accuracy": acc} for i, (lab, p) in enumerate(zip(result["labels"], emb))]
    return rows


def plot(result: dict, path) -> None:
    """Two rows (adversarial, random) of t-SNE panels, one per eps, accuracy in each title; PNG to `path`."""
    eps = result["eps"]
    fig, axes = _plot.figure(2, len(eps), panel=(3.2, 3.2))
    a, b = result["classes"]
    for r, kind in enumerate(KINDS):
        for c, e in enumerate(eps):
            ax = axes[r, c]
            emb = result["embedding"][kind][c]
            for cls, color in ((a, "tab:blue"), (b, "tab:orange")):
                mask = result["labels"] == cls
                ax.scatter(emb[mask, 0], emb[mask, 1], s=6, color=color, label=f"class {cls}")
            ax.set_title(f"{kind}, eps={e:g}: acc {100 * result['accuracy'][kind][c]:.1f}%", fontsize=9)
            ax.set_xlabel("t-SNE 1 (arbitrary units)", fontsize=8)
            ax.set_ylabel("t-SNE 2 (arbitrary units)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("t-SNE of the penultimate features of two classes (paper Figure 1)\n"
                 "top: previous-batch layerwise perturbation\nbottom: Gaussian noise at every point", fontsize=9)
    _plot.save(fig, path)
