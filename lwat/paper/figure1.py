"""Figure 1 (Section 3.3): t-SNE of VGG features under adversarial vs random layerwise perturbations."""

from __future__ import annotations

from lwat.paper import table1
from lwat.paper.plan import Analysis, vgg_noaug
from lwat.render import claim, table

NAME = "figure1"
TITLE = "Figure 1: t-SNE of VGG features under adversarial vs random layerwise perturbations"
SEEDS = {"smoke": 1, "cpu": 1, "paper": 1}
PAPER = {"caption": "Figure 1: t-SNE visualization of the final fc-layer features of dimension 512 of the VGG network "
                    "for two randomly chosen classes of the CIFAR-10 data for different values of the intensity, eps. "
                    "The top row shows the adversarial perturbations while the bottom row shows random perturbations "
                    "of the same intensity."}
ANALYSIS = "figure1-tsne"


def plan(plan, data, seeds, device):
    vgg_noaug(plan, data["cifar10"], seeds, device, "baseline", method="baseline")
    smoke = plan.scale == "smoke"
    opts = (("eps_list", (0.2,) if smoke else table1.EPS), ("classes", (0, 1)), ("n_per_class", 20 if smoke else 200))
    plan.analyses.append(Analysis(ANALYSIS, "tsne", ("baseline",), options=opts))
    plan.notes.append("The model is Table 4's baseline VGG at this scale; classes 0 and 1; eps in activation "
                      "units (the paper's values are not in its text).")


def render(res) -> list[str]:
    rows = next(iter(res.analysis_rows(ANALYSIS).values()), [])
    lines = res.plot_line(ANALYSIS, "t-SNE of the penultimate features, adversarial (top) and random (bottom) "
                                    "layerwise perturbations")
    if not rows:
        return lines
    eps = sorted({r["eps"] for r in rows})
    acc = {(r["kind"], r["eps"]): 100 * r["accuracy"] for r in rows}
    lines += table(["perturbation", *(f"eps = {e:g}" for e in eps)],
                   [[k, *(f"{acc[(k, e)]:.1f}" for e in eps)] for k in ("adversarial", "random")])
    lines += ["", "Accuracy (%) of the two shown classes (10-way prediction).", "",
              "Claims (paper: random perturbations leave the classes separable, adversarial ones do not):"]
    for e in (e for e in eps if e > 0):
        lines.append(claim(f"adversarial lowers the accuracy more than random at eps {e:g}",
                           (acc[("adversarial", e)], 0, 1), (acc[("random", e)], 0, 1), higher=False,
                           names=("adversarial", "random")))
    return lines + [""]
