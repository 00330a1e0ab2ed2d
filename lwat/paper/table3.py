"""Table 3 (Section 4): baseline vs lat for VGG-16-BN, ResNet-20 and ResNet-56 on CIFAR-10 and CIFAR-100, with flips."""

from __future__ import annotations

from lwat.paper.plan import DATA_NAMES, model, protocol
from lwat.render import claim, paper_fmt, table

NAME = "table3"
TITLE = "Table 3: baseline vs lat, VGG-16-BN, ResNet-20, ResNet-56 on CIFAR-10/100 with flips"
SEEDS = {"smoke": 1, "cpu": 2, "paper": 5}
PAPER = {
    "caption": "Table 3: Classification accuracy (%) on CIFAR-10 and CIFAR-100 for VGG and Resnet architectures. "
               "Results reported are average of 5 runs.",
    # The table's body is not in the paper text this project has (it was lost in conversion): None = unknown.
    "values": {},
}
MODELS = ("vgg16_bn", "resnet20", "resnet56")


def plan(plan, data, seeds, device):
    for key in DATA_NAMES:
        for name in MODELS:
            for method in ("baseline", "lat"):
                plan.add(f"{key}-{name}-{method}", data[key], seeds, method=method, **model(plan.scale, name),
                         **protocol(plan.scale, key, augment=True, device=device))
    plan.notes.append("Random horizontal flips, as in the paper; VGG's dropout off (the paper does not say). The "
                      "paper reports ResNet baselines at their best epoch (early stopping); the table gives final and "
                      "best test accuracy.")


def render(res) -> list[str]:
    rows = []
    for key in DATA_NAMES:
        for name in MODELS:
            for method in ("baseline", "lat"):
                g = f"{key}-{name}-{method}"
                rows.append([DATA_NAMES[key], name, "Perturbed" if method == "lat" else "Baseline",
                             paper_fmt(PAPER["values"].get(g)), res.cell(g), res.cell(g, "best_test_acc"), res.n(g)])
    lines = table(["data", "model", "type", "paper", "ours: final", "ours: best epoch", "seeds"], rows)
    lines += ["", "The paper's numbers for this table are not in the paper text this project has (the table's body "
              "was lost in conversion): 'n/a' until they are copied from the PDF.", "",
              "Claims (paper: the perturbed model beats the baseline for every model and data set):"]
    for key in DATA_NAMES:
        for name in MODELS:
            lines.append(claim(f"lat beats baseline, {name} on {DATA_NAMES[key]} (final accuracy)",
                               res.acc(f"{key}-{name}-lat"), res.acc(f"{key}-{name}-baseline"),
                               names=("lat", "baseline")))
    return lines + [""]
