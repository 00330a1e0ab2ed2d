"""Figure 3: training and test error per epoch of several runs on one figure.

Input: {run name: [per-epoch record]}, each record with "epoch" and "train_acc" / "test_acc" as fractions
(the train log's JSONL records). Train accuracy of a layerwise-trained run is measured on the perturbed
activations, as in the paper. A record without an accuracy gives NaN there; records without "epoch" are skipped.
"""

from __future__ import annotations

import numpy as np

from lwat.analysis import _plot


def compute(logs: dict[str, list[dict]]) -> dict:
    """Train and test error (fractions) per epoch of each run (paper Figure 3).

    Args:
        logs: {run name: records with "epoch", "train_acc", "test_acc" (fractions in [0, 1])}.

    Returns:
        {run name: {"epoch": (E,) array, "train_error": (E,) array, "test_error": (E,) array}}, sorted by epoch;
        error = 1 - accuracy.
    """
    if not logs:
        raise ValueError("logs is empty")
    out = {}
    for name, records in logs.items():
        recs = sorted((r for r in records if "epoch" in r), key=lambda r: r["epoch"])
        if not recs or not any("train_acc" in r or "test_acc" in r for r in recs):
            raise ValueError(f"run {name!r} has no record with 'epoch' and 'train_acc' or 'test_acc'")
        acc = {k: np.array([float(r.get(k, np.nan)) for r in recs]) for k in ("train_acc", "test_acc")}
        out[name] = {"epoch": np.array([r["epoch"] for r in recs]),
                     "train_error": 1.0 - acc["train_acc"], "test_error": 1.0 - acc["test_acc"]}
    return out


NEEDS = "log"  # the runs' per-epoch logs


def from_runs(runs: list) -> dict:
    """`compute` on the runs' logs, named by their labels (`lwat.analysis.runs` dispatches here)."""
    return compute({label: run.log for label, run in runs})


def to_rows(result: dict) -> list[dict]:
    """One row per (run, epoch): {"run", "epoch", "train_error", "test_error"} as fractions."""
    return [{"run": name, "epoch": int(e), "train_error": float(tr), "test_error": float(te)}
            for name, c in result.items() for e, tr, te in zip(c["epoch"], c["train_error"], c["test_error"])]


def plot(result: dict, path) -> None:
    """Error (%) against epoch: solid test, dashed train, one color per run; written as a PNG to `path`."""
    fig, axes = _plot.figure(panel=(6.5, 4.4))
    ax = axes[0, 0]
    for i, (name, c) in enumerate(result.items()):
        color = f"C{i % 10}"
        ax.plot(c["epoch"], 100 * c["test_error"], color=color, linestyle="-", marker=".", label=f"{name} test")
        ax.plot(c["epoch"], 100 * c["train_error"], color=color, linestyle="--", marker=".", label=f"{name} train")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("error (%)")
    ax.set_title("Training (dashed) and test (solid) error per epoch\n(paper Figure 3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _plot.save(fig, path)
