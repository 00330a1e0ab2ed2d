"""Figure 2 (Section 3.4): the singular value spectrum of the toy MLP's encoder Jacobian."""

from __future__ import annotations

from lwat.paper.plan import Analysis, toy
from lwat.render import claim, table

NAME = "figure2"
TITLE = "Figure 2: singular values of the toy MLP's encoder Jacobian"
SEEDS = {"smoke": 1, "cpu": 1, "paper": 1}
PAPER = {"caption": "Figure 2: Average singular value (SV) spectrum showing top 50 SVs for the toy example in "
                    "Section 3.4."}
ANALYSIS = "figure2-jacobian"
IMAGES = {"smoke": 2, "cpu": 1000, "paper": None}  # test images averaged over (None: all)


def plan(plan, data, seeds, device):
    toy(plan, data, seeds, device)
    limit = IMAGES[plan.scale]
    plan.analyses.append(Analysis(ANALYSIS, "jacobian", ("toy-baseline", "toy-fgsm", "toy-lat"), limit=limit))
    if limit:
        plan.notes.append(f"Singular values averaged over the first {limit} test images (the paper: all 10,000).")


def render(res) -> list[str]:
    lines = res.plot_line(ANALYSIS, "mean singular values of the encoder Jacobian")
    rows = next(iter(res.analysis_rows(ANALYSIS).values()), [])
    if not rows:
        return lines
    sv = {}
    for r in rows:
        sv.setdefault(r["model"], {})[r["index"]] = r["mean"]
    k = min(len(v) for v in sv.values())

    def total(v):
        return sum(v[i] for i in range(1, k + 1))

    def decay(v):
        return v[k] / v[1]

    lines += table(["network", "SV 1", f"SV {k}", f"sum of top {k}", f"SV {k} / SV 1"],
                   [[m, f"{v[1]:.4g}", f"{v[k]:.4g}", f"{total(v):.4g}", f"{decay(v):.3g}"]
                    for m, v in sv.items()]) + [""]

    def one(model, f):
        return (f(sv[model]), 0.0, 1) if model in sv else None

    lines.append("Claims (paper: ours and FGS have fewer dominant singular values and decay faster than the "
                 "baseline; FGS suppresses every dimension strongly, ours mainly the trailing ones):")
    for m in ("toy-lat", "toy-fgsm"):
        name = m.split("-")[1]
        lines.append(claim(f"{name}'s spectrum is below the baseline's (sum of the top {k})", one(m, total),
                           one("toy-baseline", total), higher=False, unit=""))
        lines.append(claim(f"{name}'s spectrum decays faster than the baseline's (SV {k} / SV 1)", one(m, decay),
                           one("toy-baseline", decay), higher=False, unit=""))
    lines.append(claim("fgsm suppresses the leading dimension more than lat (SV 1)", one("toy-fgsm", lambda v: v[1]),
                       one("toy-lat", lambda v: v[1]), higher=False, unit=""))
    return lines + [""]
