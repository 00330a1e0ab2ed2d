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


MIN_RUNS = 3  # runs on each side before a difference can be called "yes" or "no"


def difference(a, b) -> tuple[float, float | None, float | None, str]:
    """(mean of a minus mean of b, the 95% confidence interval's low and high ends, how it was computed).

    `a` and `b` are `Stats` or {seed: value}. Two dicts sharing at least two seeds are paired by seed (a t interval
    on the per-seed differences: lwat gives every method the same initialisation, data subset and batch order for a
    seed); otherwise Welch's interval from the means and sample stds. The interval is None with fewer than two
    values on a side (no spread to measure).
    """
    from scipy.stats import t  # the experiment platform's dependency, not the core's

    if isinstance(a, dict) and isinstance(b, dict) and len(shared := sorted(set(a) & set(b))) >= 2:
        d = [a[k] - b[k] for k in shared]
        mean, std, n = stats(d)
        half = t.ppf(0.975, n - 1) * std / math.sqrt(n)
        return mean, mean - half, mean + half, f"paired by seed, n = {n}"
    (ma, sa, na), (mb, sb, nb) = _as_stats(a), _as_stats(b)
    if na < 2 or nb < 2:
        return ma - mb, None, None, f"n = {na}/{nb}"
    va, vb = sa ** 2 / na, sb ** 2 / nb
    if va + vb == 0:
        return ma - mb, ma - mb, ma - mb, f"Welch, n = {na}/{nb}"
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    return ma - mb, ma - mb - half, ma - mb + half, f"Welch, n = {na}/{nb}"


def _as_stats(values) -> Stats:
    """`Stats` as given, or of the values of a {seed: value} dict."""
    return stats(list(values.values())) if isinstance(values, dict) else values


def verdict(a, b, *, higher: bool = True) -> str:
    """The one rule every claim of the reports goes through: "yes" when the 95% interval of a - b (`difference`)
    lies wholly above 0 (below 0 with higher=False), "no" when wholly on the other side, each only with at least
    MIN_RUNS runs on each side; otherwise "not decided"."""
    _, lo, hi, _ = difference(a, b)
    if min(_as_stats(a)[2], _as_stats(b)[2]) < MIN_RUNS or lo is None or lo <= 0 <= hi:
        return "not decided"
    return "yes" if (lo > 0) == higher else "no"


def claim(text: str, a, b, *, higher: bool = True, unit: str = "%", names=("", "")) -> str:
    """'- text: **verdict** (a vs b; difference and its 95% interval)', the verdict by `verdict`.

    a, b: `Stats`, {seed: value} (paired by seed where both are and the seeds pair), or None (not measured yet).
    """
    if a is None or b is None or (isinstance(a, dict) and not a) or (isinstance(b, dict) and not b):
        return f"- {text}: not measured yet"
    mean_a, mean_b = _as_stats(a)[0], _as_stats(b)[0]
    diff, lo, hi, how = difference(a, b)
    na, nb = (f"{n} " if n else "" for n in names)
    ci = f"95% CI [{lo:+.2f}, {hi:+.2f}]" if lo is not None else "no interval from one run"
    return (f"- {text}: **{verdict(a, b, higher=higher)}** ({na}{mean_a:.2f}{unit} vs {nb}{mean_b:.2f}{unit}; "
            f"difference {diff:+.2f}, {ci}; {how})")
