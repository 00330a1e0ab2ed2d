"""A plan's results as the report sees them (filled by `lwat.reproduce` from the files on disk), and the reads a
table's rendering makes of them: accuracy stats per group, cells, analysis rows, plot lines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lwat.config import TrainConfig
from lwat.paper.plan import Plan, Training
from lwat.render import Stats, fmt, stats


@dataclass
class RunResult:
    """What is known of one planned training (the fields of a `lwat.rundir.Run`, once it exists)."""

    training: Training
    status: str  # "finished", "unfinished (epoch k of E)", "not run yet", "not run (no data given)", ...
    dir: Path | None = None
    config: TrainConfig | None = None  # the run's own config.json
    metrics: dict | None = None
    log: list | None = None
    eval: dict | None = None  # eval.json
    host: dict | None = None  # host.json: the machine that made it, and its provenance
    has_checkpoint: bool = False

    @property
    def finished(self) -> bool:
        return self.metrics is not None


@dataclass
class Results:
    """A plan with its runs (per group, one entry per seed) and analysis results, for rendering."""

    plan: Plan
    runs: dict[str, list[RunResult]]
    analyses: dict[str, dict]  # name -> {"status": str, "seeds": {seed: rows}, "png": relative path or None}
    out: Path | None = None  # the reproduction's folder

    def finished(self, group: str) -> list[RunResult]:
        return [r for r in self.runs.get(group, []) if r.finished]

    def status(self, group: str) -> str:
        """Why a group has no number: the status of its first run."""
        runs = self.runs.get(group) or []
        if self.plan.skipped:
            return "not run at this scale"
        return runs[0].status if runs else "not planned"

    def acc(self, group: str, key: str = "test_acc") -> Stats | None:
        """Stats over the group's finished runs of metrics[key] in %."""
        return stats([100 * r.metrics[key] for r in self.finished(group) if key in r.metrics])

    def by_seed(self, group: str, key: str = "test_acc", *, eps: float | None = None) -> dict[int, float]:
        """{seed: value in %} of the group's finished runs: metrics[key], or with `eps` eval.json's accuracy under
        attack at that eps (runs not evaluated at it left out): what `lwat.render.claim` pairs by seed."""
        if eps is None:
            return {r.training.seed: 100 * r.metrics[key] for r in self.finished(group) if key in r.metrics}
        return {r.training.seed: 100 * r.eval["accuracy"][f"{eps:g}"] for r in self.finished(group)
                if r.eval and f"{eps:g}" in r.eval.get("accuracy", {})}

    def cell(self, group: str, key: str = "test_acc") -> str:
        """`acc` as "mean ± std", or why there is none."""
        return fmt(self.acc(group, key), self.status(group))

    def n(self, group: str) -> str:
        return f"n={len(self.finished(group))}"

    def analysis_rows(self, name: str) -> dict:
        """{seed key: rows} of an analysis."""
        return self.analyses.get(name, {}).get("seeds", {})

    def analysis_status(self, name: str) -> str:
        return self.analyses.get(name, {}).get("status", "not run yet")

    def seed_stats(self, name: str, eps: float, **match) -> Stats | None:
        """Accuracy (%) stats over seeds of an analysis' rows at `eps` whose fields equal `match`."""
        return stats([100 * r["accuracy"] for rows in self.analysis_rows(name).values() for r in rows
                      if math.isclose(r["eps"], eps) and all(r[k] == v for k, v in match.items())])

    def plot_line(self, name: str, what: str) -> list[str]:
        """The analysis' plot as a markdown image, or why there is none."""
        png = self.analyses.get(name, {}).get("png")
        if png:
            return [f"![{what}]({png})", ""]
        return [f"Plot ({what}): {self.analysis_status(name)}.", ""]
