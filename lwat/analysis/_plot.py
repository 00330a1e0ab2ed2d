"""Shared matplotlib helpers of the analyses: figures drawn without pyplot (Agg canvas), saved as PNG.

Using `matplotlib.figure.Figure` directly keeps the global backend and pyplot's figure list untouched,
so plotting works headless and from threads, and never opens a window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def figure(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = (5.0, 3.8)):
    """A new Figure and a 2-D array of its axes; `panel` is each panel's (width, height) in inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save(fig, path) -> Path:
    """Write `fig` to `path` as a PNG (the folder must exist) and return the path."""
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def mean_band(ax, x: Sequence[float], runs: Sequence[Sequence[float]], *, color: str, label: str,
              marker: str = "o") -> None:
    """On `ax`: the mean over runs as a line, and mean ± one sample std over runs (as `lwat.render.stats` gives it;
    none for one run) as a band of the same colour.

    Args:
        ax: a matplotlib Axes.
        x: the points' x values.
        runs: one sequence of y values per run, each aligned with `x`.
        color, label, marker: of the line (the label names it in a legend).
    """
    ys = np.asarray(runs, dtype=float)
    mean = ys.mean(0)
    std = ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(mean)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.plot(x, mean, color=color, marker=marker, markersize=4, label=label)


def accuracy_lines(result: dict, path, *, labels: dict, xlabel: str, ylabel: str, title: str) -> Path:
    """Accuracy (%) against eps, one line per key of result["accuracy"] (named by `labels`), as a PNG."""
    fig, axes = figure(panel=(6.0, 4.2))
    ax = axes[0, 0]
    styles = ["o-", "s--", "^-.", "v:", "D-"]  # distinct markers and dashes: curves may coincide
    for i, (key, values) in enumerate(result["accuracy"].items()):
        ax.plot(result["eps"], [100 * a for a in values], styles[i % len(styles)], label=labels.get(key, key))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)
