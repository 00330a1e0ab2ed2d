"""Table 6 (Section 4.3): perturbing VGG from conv1 to pool1 .. pool5."""

from __future__ import annotations

from lwat.models import VGG16_POOL_BN_DEPTHS
from lwat.paper.plan import Analysis, vgg_noaug
from lwat.render import claim, paper_fmt, table

NAME = "table6"
TITLE = "Table 6: perturbing conv1 to pool1..pool5 of VGG"
SEEDS = {"smoke": 1, "cpu": 2, "paper": 1}
PAPER = {
    "caption": "Table 6: Effect of layerwise adversarial perturbations on the classification accuracy using the VGG "
               "network on the CIFAR-10 dataset. Baseline performance is 89.4%.",
    "values": {"pool1": 89.5, "pool2": 89.62, "pool3": 90.24, "pool4": 91.1, "pool5": 91.3, "baseline": 89.4},
}
DEPTHS = dict(zip(("pool1", "pool2", "pool3", "pool4", "pool5"), VGG16_POOL_BN_DEPTHS))  # group -> points
ANALYSIS = "table6-depth"


def plan(plan, data, seeds, device):
    vgg_noaug(plan, data["cifar10"], seeds, device, "baseline", method="baseline")
    for pool, depth in DEPTHS.items():
        vgg_noaug(plan, data["cifar10"], seeds, device, pool, method="lat", depth=depth)
    plan.analyses.append(Analysis(ANALYSIS, "depth", tuple(DEPTHS), seeds="all", baseline="baseline"))
    plan.notes.append("'conv1 to poolk' perturbs the first 2, 4, 7, 10 or 13 BatchNorm outputs of VGG-16-BN "
                      "(lwat.models.VGG16_POOL_BN_DEPTHS); 13 leaves the classifier's BatchNorm unperturbed. "
                      "The baseline is Table 4's.")


def render(res) -> list[str]:
    pools = list(DEPTHS)
    rows = [["paper", *(paper_fmt(PAPER["values"][p]) for p in pools), paper_fmt(PAPER["values"]["baseline"])],
            ["ours", *(res.cell(p) for p in pools), res.cell("baseline")],
            ["seeds", *(res.n(p) for p in pools), res.n("baseline")]]
    lines = table(["Layer (conv1 to)", *(f"{p} ({d} points)" for p, d in DEPTHS.items()), "baseline"], rows)
    lines += [""] + res.plot_line(ANALYSIS, "accuracy against the depth of the perturbation")
    acc = {p: res.acc(p) for p in pools}
    lines.append("Claims (paper: the gain grows with depth and is largest when perturbing up to pool5):")
    lines.append(claim("perturbing up to pool5 beats perturbing up to pool1", acc["pool5"], acc["pool1"],
                       names=("pool5", "pool1")))
    for a, b in zip(pools, pools[1:]):  # "rises with each deeper layer": one decided step at a time
        lines.append(claim(f"accuracy rises from {a} to {b}", acc[b], acc[a], names=(b, a)))
    for p in pools:
        lines.append(claim(f"{p} beats the baseline", acc[p], res.acc("baseline"), names=(p, "baseline")))
    return lines + [""]
