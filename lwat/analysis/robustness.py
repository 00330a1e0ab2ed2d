"""Table 4 as a plot: accuracy under an attack against its eps, one line per training method (mean +- std).

Input: one record per (run, eps), {"label": method, "panel": how eps is read, "eps": float, "accuracy":
fraction}; records of one label and eps (seeds) are averaged. Each panel (e.g. "pixel units" and
"standardized units") is drawn side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

from lwat.analysis import _plot
from lwat.render import stats_dict


def compute(records: Sequence[dict]) -> dict:
    """Mean and std of accuracy per (panel, label, eps).

    Args:
        records: {"label", "panel", "eps", "accuracy" (fraction)} each.

    Returns:
        {panel: {label: [{"eps", "mean", "std", "n"}] sorted by eps}}, panels and labels in first-seen order.
    """
    if not records:
        raise ValueError("records is empty")
    values: dict[str, dict[str, dict[float, list[float]]]] = {}
    for rec in records:
        missing = {"label", "panel", "eps", "accuracy"} - set(rec)
        if missing:
            raise ValueError(f"robustness record {rec!r} lacks {sorted(missing)}")
        by_eps = values.setdefault(str(rec["panel"]), {}).setdefault(str(rec["label"]), {})
        by_eps.setdefault(float(rec["eps"]), []).append(float(rec["accuracy"]))
    return {panel: {label: [{"eps": e, **stats_dict(accs)} for e, accs in sorted(by_eps.items())]
                    for label, by_eps in labels.items()}
            for panel, labels in values.items()}


NEEDS = "eval"  # the runs' eval.json

PIXEL_UNITS = (("pixel units", 1.0),)


def from_runs(runs: list, *, eps_list=None, readings=PIXEL_UNITS) -> dict:
    """`compute` on the runs' eval.json (`lwat.analysis.runs` dispatches here).

    Args:
        runs: [(label, run)]; runs of one label (seeds) are averaged.
        eps_list: the eps to draw; default every eps in each run's eval.json.
        readings: [(panel name, scale)]: a panel shows eval.json's accuracy at pixel eps `eps x scale`.
    """
    records = []
    for label, run in runs:
        acc = run.eval["accuracy"]
        for panel, scale in readings:
            eps = sorted(map(float, acc)) if eps_list is None else eps_list
            records += [{"label": label, "panel": panel, "eps": e, "accuracy": acc[f"{e * scale:g}"]}
                        for e in eps if f"{e * scale:g}" in acc]
    return compute(records)


def to_rows(result: dict) -> list[dict]:
    """One row per (panel, label, eps): {"panel", "label", "eps", "mean", "std", "n"}, accuracy as fractions."""
    return [{"panel": panel, "label": label, **point}
            for panel, labels in result.items() for label, points in labels.items() for point in points]


def plot(result: dict, path) -> None:
    """Accuracy (%) +- std against eps, one line per label, one panel per way of reading eps; PNG to `path`."""
    fig, axes = _plot.figure(1, len(result), panel=(5.2, 4.2))
    styles = ["o-", "s--", "^-.", "v:", "D-"]
    for ax, (panel, labels) in zip(axes[0], result.items()):
        for i, (label, points) in enumerate(labels.items()):
            ax.errorbar([p["eps"] for p in points], [100 * p["mean"] for p in points],
                        yerr=[100 * p["std"] for p in points], fmt=styles[i % len(styles)], capsize=3,
                        label=f"{label} (n={points[0]['n']})")
        ax.set_xlabel(f"FGSM eps ({panel})")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Accuracy under FGSM, eps in {panel}\n(paper Table 4)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _plot.save(fig, path)
