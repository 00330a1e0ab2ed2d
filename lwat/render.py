"""Numbers as report text, in one place: mean ± std over seeds, markdown tables, claims computed from the numbers.

Used by the paper's tables (`lwat.paper`), `lwat demo` and the analyses that average seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Stats = tuple[float, float, int]  # (mean, sample std (0 for one value), n)


def stats(values: Sequence[float | None]) -> Stats | None:
    """(mean, sample std, n) of the values that are not None or NaN; None when there are none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def stats_dict(values: Sequence[float]) -> dict:
    """`stats` as {"mean", "std", "n"} (rows of JSON and CSV files); values must not be empty."""
    return dict(zip(("mean", "std", "n"), stats(values)))


def fmt(s: Stats | None, missing: str = "—", digits: int = 1) -> str:
    """"mean ± std" (the mean alone for one value), or `missing`."""
    if s is None:
        return missing
    mean, std, n = s
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def paper_fmt(v) -> str:
    """A number copied from the paper as it was printed ("n/a" when unknown)."""
    return "n/a" if v is None else (v if isinstance(v, str) else f"{v:g}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def claim(text: str, a: Stats | None, b: Stats | None, *, higher: bool = True, unit: str = "%",
          names=("", "")) -> str:
    """'- text: **yes** (a vs b)': whether mean a > mean b (or < with higher=False).

    Equal means, or a difference smaller than the larger std, make neither: **not shown**, with the reason.
    """
    if a is None or b is None:
        return f"- {text}: not measured yet"
    holds = a[0] > b[0] if higher else a[0] < b[0]
    spread = (" — equal" if a[0] == b[0] else " — within the seeds' spread" if abs(a[0] - b[0]) < max(a[1], b[1])
              else "")
    verdict = "not shown" if spread else "yes" if holds else "no"
    na, nb = (f"{n} " if n else "" for n in names)
    return f"- {text}: **{verdict}** ({na}{a[0]:.2f}{unit} vs {nb}{b[0]:.2f}{unit}{spread})"
