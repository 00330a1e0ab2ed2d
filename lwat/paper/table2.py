"""Table 2 and Section 3.4: the toy MLP on grayscale CIFAR-10; FGSM images crafted on each network, classified by the
baseline; clean accuracy of the three networks."""

from __future__ import annotations

from lwat.evaluate import FGSM_EPS
from lwat.paper.plan import TOY_GROUPS, Analysis, toy
from lwat.render import claim, fmt, paper_fmt, table

NAME = "table2"
TITLE = "Table 2 and Section 3.4: toy MLP on grayscale CIFAR-10, FGSM transfer to the baseline, clean accuracy"
SEEDS = {"smoke": 1, "cpu": 2, "paper": 1}
PAPER = {
    "caption": "Table 2: Effect of different perturbations tested on the baseline network for the toy example in "
               "Section 3.4. (FGS perturbation from: Baseline n/w, FGS n/w, Our n/w.)",
    "columns": {"toy-baseline": "Baseline n/w", "toy-fgsm": "FGS n/w", "toy-lat": "Our n/w"},
    "values": {"toy-baseline": (39.51, 8.6, 1.92, 0.51, 0.12, 0.03),
               "toy-fgsm": (39.51, 32.14, 26.08, 20.74, 16.23, 12.47),
               "toy-lat": (39.51, 26.92, 18.16, 12.23, 8.63, 6.05)},
    # Section 3.4: "the proposed method improves the baseline performance from 39.5% to 43.3% on the original data
    # while the accuracy of the FGS network is 40.5%."
    "clean": {"toy-baseline": 39.5, "toy-fgsm": 40.5, "toy-lat": 43.3},
}
ANALYSIS = "table2-transfer"


def plan(plan, data, seeds, device):
    toy(plan, data, seeds, device)
    plan.analyses.append(Analysis(ANALYSIS, "transfer", tuple(PAPER["columns"]), seeds="each", target="toy-baseline",
                                  options=(("eps_list", FGSM_EPS),)))


def render(res) -> list[str]:
    per_seed, status = res.analysis_rows(ANALYSIS), res.analysis_status(ANALYSIS)

    def at(group, e):
        return res.seed_stats(ANALYSIS, e, source=group)

    columns = PAPER["columns"]
    header = ["eps", *(f"{columns[g]}: paper" for g in columns), *(f"{columns[g]}: ours (n={len(per_seed)})"
                                                                   for g in columns)]
    rows = [[f"{e:g}", *(paper_fmt(PAPER["values"][g][i]) for g in columns), *(fmt(at(g, e), status) for g in columns)]
            for i, e in enumerate(FGSM_EPS)]
    lines = ["Accuracy (%) of the baseline toy network on FGSM images crafted on each network:", ""]
    lines += table(header, rows) + [""]
    lines += ["Clean test accuracy (%) of the three toy networks (Section 3.4):", ""]
    lines += table(["network", "paper", "ours"],
                   [[f"{TOY_GROUPS[g.split('-', 1)[1]]} ({res.n(g)})", paper_fmt(PAPER["clean"][g]), res.cell(g)]
                    for g in columns]) + [""]
    top = FGSM_EPS[-1]
    lines.append("Claims (paper: the baseline is most robust to FGSM images from the FGS network, then ours, then "
                 "its own: FGS > Ours >> base; the layerwise network is the most accurate):")
    for e in FGSM_EPS[1:]:
        lines.append(claim(f"images from the FGS n/w fool the baseline less than those from our n/w at eps {e:g}",
                           at("toy-fgsm", e), at("toy-lat", e), names=("FGS n/w", "our n/w")))
    lines.append(claim(f"images from our n/w fool the baseline less than its own at eps {top:g}",
                       at("toy-lat", top), at("toy-baseline", top), names=("our n/w", "baseline n/w")))
    for a, b in (("lat", "baseline"), ("fgsm", "baseline"), ("lat", "fgsm")):
        lines.append(claim(f"{a} beats {b} on clean accuracy", res.acc(f"toy-{a}"), res.acc(f"toy-{b}"),
                           names=(a, b)))
    return lines + [""]
