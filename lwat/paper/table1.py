"""Table 1 (Section 3.3): how adversarial previous-batch layerwise perturbations are, against FGSM at the input."""

from __future__ import annotations

from lwat.paper.plan import Analysis, vgg_noaug
from lwat.render import MIN_RUNS, claim, verdict, fmt, paper_fmt, table

NAME = "table1"
TITLE = "Table 1: previous-batch layerwise perturbations vs FGSM on a trained VGG"
SEEDS = {"smoke": 1, "cpu": 2, "paper": 1}
EPS = (0.0, 0.05, 0.1, 0.15, 0.2)  # Table 1's eps (and Figure 1's)
PAPER = {
    "caption": "Table 1: Comparison of the strength of adversarial examples between the FGS approach applied at the "
               "input and using layerwise perturbations as described in Section 3.2. Reported numbers are "
               "classification accuracies for different values of eps.",
    "rows": {"FGS [5]": (92.4, 53.28, 41.58, 36.44, 33.85),
             "Ours - all layers": (92.4, 48.56, 21.72, 14.76, 14.19)},
}
ANALYSIS = "table1-strength"
ROWS = (("FGS [5]", "fgsm"), ("Ours - all layers", "layerwise"))  # the paper's rows and our analysis' kinds
CONTROLS = (("previous-batch signs at the input only (control)", "input_prev"),
            ("random signs at the input only (control)", "input_random"),
            ("random signs at every point (control)", "random"))


def plan(plan, data, seeds, device):
    vgg_noaug(plan, data["cifar10"], seeds, device, "baseline", method="baseline")
    plan.analyses.append(Analysis(ANALYSIS, "strength", ("baseline",), seeds="each", options=(("eps_list", EPS),)))
    plan.notes.append("The model is Table 4's baseline VGG at this scale (the paper: 'a conventionally trained "
                      "deep model').")


def render(res) -> list[str]:
    def at(kind, e):
        return res.seed_stats(ANALYSIS, e, kind=kind)

    def ours(kind):
        rows = [r for seed in res.analysis_rows(ANALYSIS).values() for r in seed]
        status = res.analysis_status(ANALYSIS)
        if rows and not any(r["kind"] == kind for r in rows):  # computed before this row existed
            status = "needs checkpoint, re-run"
        return [fmt(at(kind, e), status) for e in EPS]

    def n(kind):  # the seeds whose analysis has this row (one computed before the row existed lacks it)
        return f"n={sum(any(r['kind'] == kind for r in seed) for seed in res.analysis_rows(ANALYSIS).values())}"

    rows = []
    for row, kind in ROWS:
        rows += [[row, "paper", *map(paper_fmt, PAPER["rows"][row])], ["", f"ours ({kind}, {n(kind)})", *ours(kind)]]
    rows += [[row, f"ours ({n(kind)})", *ours(kind)] for row, kind in CONTROLS]
    lines = table(["Type", "", *(f"eps = {e:g}" for e in EPS)], rows) + [""]
    lines.append("Claims (paper: the layerwise previous-batch perturbation is more adversarial than FGSM; the same "
                 "signs at the input only are not adversarial):")
    for e in EPS[1:]:
        lines.append(claim(f"layerwise accuracy below FGSM accuracy at eps {e:g}", at("layerwise", e), at("fgsm", e),
                           higher=False, names=("layerwise", "FGSM")))
    top = EPS[-1]
    lines.append(claim(f"input-only previous-batch signs hurt less than layerwise ones at eps {top:g}",
                       at("input_prev", top), at("layerwise", top), names=("input only", "layerwise")))
    lines.append(_negligible_drop(at))
    for e in EPS[1:]:
        lines.append(claim(f"input-only previous-batch signs hurt more than random input signs of the same size at "
                           f"eps {e:g}", at("input_prev", e), at("input_random", e), higher=False,
                           names=("previous-batch", "random")))
    lines.append(claim(f"random signs hurt less than the gradient's at eps {top:g}", at("random", top),
                       at("layerwise", top), names=("random", "layerwise")))
    lines.append("")
    lines += res.plot_line(ANALYSIS, "accuracy under each perturbation against eps")
    lines.append("eps is in pixel units for FGSM and the input-only controls, in the perturbation points' activation "
                 "units (fixed scale, no (M - m) factor) for the layerwise rows, as in the paper.")
    return lines


def _negligible_drop(at) -> str:
    """The paper's text: previous-batch signs at the input only cause a 'negligible drop', at an eps it does not give
    (nor its unit). What the data can say: from which pixel eps on the drop from clean accuracy is decided (by the
    verdict rule) to be real."""
    text = "input-only previous-batch signs cause a negligible drop (the paper's words; it gives no eps)"
    clean = at("input_prev", 0.0)
    if clean is None or any(at("input_prev", e) is None for e in EPS[1:]):
        return f"- {text}: not measured yet"
    real = [e for e in EPS[1:] if verdict(at("input_prev", e), clean, higher=False) == "yes"]
    lines = [claim(f"input-only previous-batch signs lower accuracy at pixel eps {e:g}", at("input_prev", e), clean,
                   higher=False, names=("perturbed", "clean")) for e in EPS[1:]]
    tail = (f"the drop is not negligible from pixel eps {min(real):g} on" if real
            else f"no drop is decided at any eps (n = {clean[2]}; the rule needs {MIN_RUNS} runs a side)")
    return "\n".join([f"- {text}: at the eps the paper leaves open, {tail}", *lines])
