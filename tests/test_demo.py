"""Tests of lwat.demo's picture: it draws what its table says (one colour per method, mean over seeds and a band)."""

import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection

from lwat import demo
from lwat.analysis import _plot


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """run_demo with 2 seeds of 2 epochs: the figure it saved as curves.png, and its table."""
    out = tmp_path_factory.mktemp("demo")
    figures = []
    save = _plot.save
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_plot, "save", lambda fig, path: figures.append(fig) or save(fig, path))
        text = demo.run_demo(out, epochs=2, seeds=2, device="cpu")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(figures) == 1
    return figures[0], text


def table_means(text):
    """{method: [clean, FGSM eps...] mean accuracies in %} from the demo's markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in demo.METHODS:
            rows[cells[0]] = [float(c.split("±")[0]) for c in cells[1:1 + 1 + len(demo.EPS)]]
    return rows


def test_demo_picture_has_one_colour_per_method_with_mean_and_band(drawn):
    fig, text = drawn
    errors, robust = fig.axes
    colours = {}
    for ax in (errors, robust):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == list(demo.METHODS)  # one line per method, not per seed
        for line in lines:
            assert colours.setdefault(line.get_label(), line.get_color()) == line.get_color()  # same in both panels
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == len(demo.METHODS)
    assert len(set(colours.values())) == len(demo.METHODS)
    # The FGSM panel is the table: its means at eps 0 (clean) and each FGSM eps.
    means = table_means(text)
    for line in robust.get_lines():
        assert list(line.get_xdata()) == [0.0, *demo.EPS]
        np.testing.assert_allclose(line.get_ydata(), means[line.get_label()], atol=0.051)
    assert [list(line.get_xdata()) for line in errors.get_lines()] == [[1, 2], [1, 2]]
    assert re.search(r"mean over 2 seed\(s\).*± 1 std", fig._suptitle.get_text())


def test_demo_legend_covers_no_data(drawn):
    fig, _ = drawn
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(demo.METHODS)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # lays the figure out as savefig did
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
