"""The paper's experiments by name: every table and figure of lwat/paper/ as a preset of `lwat reproduce`.

A preset knows three things, all in its module: the paper's published numbers (with the caption), the plan that
reproduces them at a scale (`Preset.plan`: named `TrainConfig`s, seeds 0..N-1, the evaluations and analyses to run on
them) and how to set our numbers beside the paper's (`Preset.render`, with claims computed from the numbers, never
written in advance). Trainings shared by presets have equal configs, so `lwat.reproduce` trains them once; their run
directories get one name whichever preset runs first (vgg-noaug-..., toy-..., table3-...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lwat.paper import (
    eps, figure1, figure2, figure3, regularizers, table1, table2, table3, table4, table5, table6, table7,
)
from lwat.paper.plan import (  # noqa: F401  (re-exported: the API scripts and lwat sweep use)
    SCALES, Analysis, DataSource, Evaluation, Plan, Training, check_scale, data_identity, data_label, resolve_data,
    toy_config,
)
from lwat.paper.results import Results, RunResult  # noqa: F401
from lwat.paper.timings import estimate_cpu_seconds

TABLES = (table1, figure1, table2, figure2, table3, figure3, table4, table5, table6, eps, table7)  # report order
STUDIES = (regularizers,)  # beyond the paper: reported only when asked for


@dataclass(frozen=True)
class Preset:
    """One experiment of the paper (a module of lwat/paper/)."""

    name: str
    title: str  # what it reproduces
    caption: str  # the paper's caption
    seeds: dict[str, int]  # default number of seeds per scale
    build: Callable[[Plan, dict, int, str], None]  # fills a Plan: (plan, data sources, seeds, device)
    render: Callable[[Results], list[str]]  # markdown lines of the report section
    draw: Callable | None = None  # (results, out folder) -> None: figures of the section, drawn when it is written
    study: bool = False  # beyond the paper: a section of its own report only

    def plan(self, scale: str, seeds: int | None = None, data: dict | None = None, device: str = "auto") -> Plan:
        """The trainings, evaluations and analyses of this preset at `scale`.

        Args:
            scale: a key of SCALES.
            seeds: trainings per group (seeds 0..seeds-1); default `self.seeds[scale]`.
            data: `resolve_data(scale, ...)`; default: no data given (smoke scale: synthetic).
            device: TrainConfig.device of the trainings.

        Returns:
            The Plan; `plan.skipped` says why a preset runs nothing at this scale.
        """
        check_scale(scale)
        seeds = self.seeds[scale] if seeds is None else seeds
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        plan = Plan(self.name, scale, seeds)
        self.build(plan, resolve_data(scale) if data is None else data, seeds, device)
        return plan


PRESETS: dict[str, Preset] = {m.NAME: Preset(m.NAME, m.TITLE, m.PAPER["caption"], m.SEEDS, m.plan, m.render,
                                            getattr(m, "draw", None), m in STUDIES) for m in (*TABLES, *STUDIES)}


def get_preset(name: str) -> Preset:
    """The preset registered under `name`; an unknown name is a ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}, all")
    return PRESETS[name]


def list_presets() -> list[dict]:
    """Every preset, then "all", with what it reproduces, its trainings per scale and their cpu-scale CPU time.

    Returns:
        One dict per preset: {"name", "title", "trainings": {scale: count}, "cifar100": {scale: how many of those
        need CIFAR-100}, "cpu_seconds": [estimated seconds of each cpu-scale training (None: unmeasured model)],
        "skipped": {scale: reason}}. The last, "all", counts trainings shared by presets once.
    """
    rows, unique = [], {scale: {} for scale in SCALES}
    for preset in PRESETS.values():
        row = {"name": preset.name, "title": preset.title, "trainings": {}, "cifar100": {}, "skipped": {}}
        for scale in SCALES:
            plan = preset.plan(scale)
            row["trainings"][scale] = len(plan.trainings)
            row["cifar100"][scale] = sum(t.group.startswith("cifar100") for t in plan.trainings)
            if plan.skipped:
                row["skipped"][scale] = plan.skipped
            for t in plan.trainings if not preset.study else ():  # "all" is the paper's presets
                unique[scale][repr(t.config)] = t
        row["cpu_seconds"] = [estimate_cpu_seconds(t.config) for t in preset.plan("cpu").trainings]
        rows.append(row)
    rows.append({"name": "all", "title": "every preset of the paper", "skipped": {},
                 "trainings": {scale: len(ts) for scale, ts in unique.items()},
                 "cifar100": {scale: sum(t.group.startswith("cifar100") for t in ts.values())
                              for scale, ts in unique.items()},
                 "cpu_seconds": [estimate_cpu_seconds(t.config) for t in unique["cpu"].values()]})
    return rows


def format_presets() -> str:
    """`list_presets()` as the text table `lwat presets` prints."""
    head = ("preset", *SCALES, "cpu: min per training", "cpu: CPU hours", "reproduces")
    rows = [head]
    for r in list_presets():
        counts = ["—" if scale in r["skipped"] else str(r["trainings"][scale])
                  + (f" ({r['cifar100'][scale]} C100)" if r["cifar100"][scale] else "") for scale in SCALES]
        known = [s for s in r["cpu_seconds"] if s is not None]
        if not known:
            per, total = "—", "—"
        else:
            lo, hi = round(min(known) / 60), round(max(known) / 60)
            per, total = (f"{lo}" if lo == hi else f"{lo}-{hi}"), f"{sum(known) / 3600:.1f}"
        rows.append((r["name"], *counts, per, total, r["title"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines + [
        "",
        "Trainings per scale (C100: of which need CIFAR-100; — : not run at that scale). CPU time: estimated for",
        "this project's 2-core machine from the timings in lwat/paper/cpu_timings.json (each with its evidence),",
        "CIFAR-100 trainings included; shared trainings (e.g. Table 4's baseline, also in Tables 1, 5 and 6) are",
        "counted once in 'all'."])
