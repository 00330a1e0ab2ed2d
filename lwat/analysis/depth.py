"""Table 6: test accuracy against how deep the layerwise perturbations reach (points conv1 .. the label).

Input: one record per trained run, {"depth": int or None, "label": str, "accuracy": fraction, ...}; depth is
the number of perturbation points (`lwat.attach(depth=...)`), None meaning every point. A record labelled
"baseline" (no perturbation) is drawn as a horizontal line. Several runs of one label (seeds) are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lwat.analysis import _plot
from lwat.render import stats_dict

BASELINE = "baseline"


def compute(results: Sequence[dict], baseline: float | None = None) -> dict:
    """Mean and std of accuracy per label, sorted by depth (paper Table 6).

    Args:
        results: records with "label", "depth" (int >= 1 or None = all points) and "accuracy" (fraction).
            Records labelled "baseline" form the baseline.
        baseline: baseline accuracy (fraction), added to any "baseline" records.

    Returns:
        {"rows": [{"label", "depth", "mean", "std", "n"}] sorted by depth (None last),
         "baseline": {"mean", "std", "n"} or None}. std is the sample std over runs (0 for one run).
    """
    groups: dict[str, list[dict]] = {}
    for rec in results:
        missing = {"label", "depth", "accuracy"} - set(rec)
        if missing:
            raise ValueError(f"depth record {rec!r} lacks {sorted(missing)}")
        groups.setdefault(str(rec["label"]), []).append(rec)
    base_values = [float(r["accuracy"]) for r in groups.pop(BASELINE, [])]
    if baseline is not None:
        base_values.append(float(baseline))
    rows = []
    for label, recs in groups.items():
        depths = {r["depth"] for r in recs}
        if len(depths) > 1:
            raise ValueError(f"label {label!r} has several depths {sorted(depths, key=str)}")
        rows.append({"label": label, "depth": recs[0]["depth"], **stats_dict([float(r["accuracy"]) for r in recs])})
    rows.sort(key=lambda r: math.inf if r["depth"] is None else r["depth"])  # stable: ties keep input order
    return {"rows": rows, "baseline": stats_dict(base_values) if base_values else None}


NEEDS = "log"  # each run's final test accuracy and its config's depth


def from_runs(runs: list, *, baseline=()) -> dict:
    """`compute` on the runs' final test accuracy, labelled by the runs' labels; `baseline` runs form the baseline
    (`lwat.analysis.runs` dispatches here)."""
    return compute([{"depth": run.config.depth, "label": label, "accuracy": run.log[-1]["test_acc"]}
                    for label, run in [*runs, *((BASELINE, r) for r in baseline)]])


def to_rows(result: dict) -> list[dict]:
    """The rows, then the baseline as a row with depth 0 when present; accuracy as fractions."""
    rows = [dict(r) for r in result["rows"]]
    if result["baseline"] is not None:
        rows.append({"label": BASELINE, "depth": 0, **result["baseline"]})
    return rows


def plot(result: dict, path) -> None:
    """Mean accuracy (%) +- std per label by depth, the baseline as a dashed line; PNG to `path`."""
    fig, axes = _plot.figure(panel=(6.0, 4.2))
    ax = axes[0, 0]
    rows = result["rows"]
    pos = list(range(len(rows)))
    means = [100 * r["mean"] for r in rows]
    stds = [100 * r["std"] for r in rows]
    # Points with error bars, not bars: the differences are a few tenths of a percent, so the axis is zoomed.
    ax.errorbar(pos, means, yerr=stds, fmt="o-", capsize=4, color="tab:blue",
                label="layerwise perturbation (mean +- std over runs)")
    ax.set_xticks(pos, [f"{r['label']}\n({'all' if r['depth'] is None else r['depth']} pts)" for r in rows])
    values = [m - s for m, s in zip(means, stds)] + [m + s for m, s in zip(means, stds)]
    if result["baseline"] is not None:
        base = 100 * result["baseline"]["mean"]
        ax.axhline(base, color="tab:red", linestyle="--", label=f"baseline {base:.2f}%")
        values.append(base)
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.5, 0.2 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    ax.set_xlabel("deepest perturbed layer (number of perturbation points)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs depth of layerwise perturbations\n(paper Table 6)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    _plot.save(fig, path)
