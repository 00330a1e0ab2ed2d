"""Shared matplotlib helpers of the analyses: figures drawn without pyplot (Agg canvas), saved as PNG.

Using `matplotlib.figure.Figure` directly keeps the global backend and pyplot's figure list untouched,
so plotting works headless and from threads, and never opens a window.
"""

from __future__ import annotations

from pathlib import Path


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
