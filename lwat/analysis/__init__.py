"""The paper's analyses, one module each: `compute(...)` returns numbers, `plot(result, path)` draws a PNG,
`to_rows(result)` gives CSV rows. Each also declares what a run must provide (`NEEDS`: "log", "eval" or "model") and
turns labelled runs into its inputs (`from_runs`), so `lwat analyze` and `lwat reproduce` share one dispatch
(`lwat.analysis.runs`); one whose rows change bumps its `VERSION` (default 1).

strength (Table 1), tsne (Figure 1), jacobian (Figure 2), transfer (Table 2), robustness (Table 4),
depth (Table 6), curves (Figure 3).
"""

from __future__ import annotations

from types import ModuleType

from lwat.analysis import curves, depth, jacobian, robustness, strength, transfer, tsne

# name -> module with compute(), plot(result, path) and to_rows(result)
ANALYSES: dict[str, ModuleType] = {
    "strength": strength,
    "tsne": tsne,
    "jacobian": jacobian,
    "transfer": transfer,
    "robustness": robustness,
    "depth": depth,
    "curves": curves,
}


def get_analysis(name: str) -> ModuleType:
    """The analysis module registered under `name`; an unknown name is a ValueError."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; known: {', '.join(sorted(ANALYSES))}")
    return ANALYSES[name]


__all__ = ["ANALYSES", "get_analysis", "curves", "depth", "jacobian", "robustness", "strength", "transfer",
           "tsne"]
