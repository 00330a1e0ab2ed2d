"""Figure 3 (Section 4): training and test error per epoch of VGG, baseline vs lat (Table 3's VGG runs)."""

from __future__ import annotations

from lwat.paper.plan import DATA_NAMES, Analysis, model, protocol
from lwat.render import claim, stats

NAME = "figure3"
TITLE = "Figure 3: training and test error per epoch, VGG baseline vs lat"
SEEDS = {"smoke": 1, "cpu": 1, "paper": 1}
PAPER = {"caption": "Figure 3: Training and test error rates for VGG network trained on CIFAR-10 and CIFAR-100 "
                    "datasets. The training error rates are computed on the perturbed activations in each epoch."}


def plan(plan, data, seeds, device):
    for key in DATA_NAMES:
        for method in ("baseline", "lat"):
            plan.add(f"{key}-vgg16_bn-{method}", data[key], seeds, stem=f"table3-{key}-vgg16_bn-{method}",
                     method=method, **model(plan.scale, "vgg16_bn"),
                     **protocol(plan.scale, key, augment=True, device=device))
        plan.analyses.append(Analysis(f"figure3-curves-{key}", "curves",
                                      (f"{key}-vgg16_bn-baseline", f"{key}-vgg16_bn-lat")))
    plan.notes.append("The runs are Table 3's VGG runs (with flips); training error is measured on the perturbed "
                      "activations, as in the paper.")


def render(res) -> list[str]:
    lines = []
    for key, data in DATA_NAMES.items():
        lines += [f"{data}:", ""]
        lines += res.plot_line(f"figure3-curves-{key}", f"train and test error per epoch, {data}")
        base, lat = ([r for r in res.finished(f"{key}-vgg16_bn-{m}") if r.training.seed == 0]  # the plot's seed
                     for m in ("baseline", "lat"))
        if not base or not lat:
            continue

        def last(runs, k):
            return stats([100 * (1 - r.log[-1][k]) for r in runs])

        lines.append("Claims (paper: the perturbed model's training error, on perturbed activations, stays higher "
                     "while its test error ends lower):")
        lines.append(claim(f"lat's final training error is above the baseline's ({data}, seed 0)",
                           last(lat, "train_acc"), last(base, "train_acc"), names=("lat", "baseline")))
        lines.append(claim(f"lat's final test error is below the baseline's ({data}, seed 0)",
                           last(lat, "test_acc"), last(base, "test_acc"), higher=False, names=("lat", "baseline")))
        lines.append("")
    return lines
