"""REPORT.md as text: its header and one section per table (caption, setup, notes, the table's own rendering)."""

from __future__ import annotations

from collections import Counter

from lwat.paper.plan import SCALES, data_label
from lwat.paper.results import Results
from lwat.rundir import machine

TITLE = ("# Reproduction of Sankaranarayanan et al., \"Regularizing deep networks using efficient layerwise "
         "adversarial training\" (AAAI 2018)")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def train_seconds(runs) -> float:
    """Training seconds summed from the runs' logs (evaluation excluded)."""
    return sum(sum(rec.get("seconds", 0.0) for rec in r.log or []) for r in runs)


def hardware(runs) -> str:
    """How many of `runs` each machine made (`lwat.rundir.machine`)."""
    counts = Counter(machine(r.host) or f"{(r.metrics or {}).get('device', '?')} (machine not recorded)" for r in runs)
    return "; ".join(f"{what}: {n} run{'s' * (n != 1)}" for what, n in counts.items()) or "no run finished"


def header(scale: str, runs: list, data: dict, needed: set, command: str | None) -> list[str]:
    """The report's first lines: scale, command, data (of the data sets in `needed`), finished runs, their wall time
    and machines."""
    labels = sorted({data_label(r.config.dataset, r.config.data_dir) for r in runs})
    missing = [s.label.split(" (")[0] for k, s in data.items() if k in needed and not s.available]
    note = (f" ({' and '.join(missing)} not given to this command: it reports the finished runs under runs/ and "
            "trains nothing)") if missing else ""
    lines = [TITLE, "", f"- Scale: **{scale}**: {SCALES[scale]}."] + ([f"- Command: `{command}`"] if command else [])
    lines += [f"- Data: {'; '.join(labels) or 'no run finished yet'}{note}",
              f"- Finished trainings: {len(runs)}; wall time summed from their logs: {hours(train_seconds(runs))}",
              f"- Hardware: {hardware(runs)}",
              "- Our numbers are mean ± sample std over seeds (n = seeds); the paper's are copied from its text. "
              "Claims are computed from the numbers below, so they may say no.", ""]
    if scale == "smoke":
        lines += ["**Smoke scale: the numbers below only show that every step runs; they say nothing about the "
                  "paper.**", ""]
    return lines


def section(preset, res: Results) -> list[str]:
    """The report section of one preset: caption, setup, notes, tables with the paper's numbers, claims, plots."""
    lines = [f"## {preset.name}: {preset.title}", "", f"> {'' if preset.study else 'Paper, '}{preset.caption}", ""]
    lines += _setup(res) + [""]
    lines += [f"Note: {n}" for n in res.plan.notes] + ([""] if res.plan.notes else [])
    return lines + preset.render(res) + [""]


def _setup(res: Results) -> list[str]:
    plan = res.plan
    if plan.skipped:
        return [f"- **Not run at {plan.scale} scale:** {plan.skipped}"]
    # The configs of the trainings that ran or can run here (planned ones without data and without runs say nothing).
    present = {g for g, runs in res.runs.items() if any(r.config is not None for r in runs)}
    cfgs = ([t.config for t in plan.trainings if t.available or t.group in present]
            or [t.config for t in plan.trainings])
    models = ", ".join(dict.fromkeys(f"{c.model} (width {c.width:g})" for c in cfgs))
    used, missing = {}, {}  # per data set (as planned): the data its runs used, or that it was not given
    for runs in res.runs.values():
        done = [r.config for r in runs if r.config is not None]
        t = runs[0].training
        if done or t.available:
            for c in done or [t.config]:  # every run's data, so a mix shows
                used.setdefault(t.config.dataset, []).append(data_label(c.dataset, c.data_dir))
        else:
            missing[t.config.dataset] = data_label(t.config.dataset, t.config.data_dir) + ": not given"
    data = [x for labels in used.values() for x in labels] + [m for d, m in missing.items() if d not in used]
    subsets = ", ".join(dict.fromkeys(f"{c.train_subset:,} (class-balanced subset)" if c.train_subset else "all"
                                      for c in cfgs))
    schedule = ", ".join(dict.fromkeys(f"{c.epochs} epochs, batch {c.batch_size}, lr {c.lr:g} / {c.lr_drop_factor:g} "
                                       f"every {c.lr_drop_every}" for c in cfgs))
    aug = ", ".join(dict.fromkeys(" + ".join([n for n, on in (("flip", c.flip), ("crop", c.crop)) if on]) or "none"
                                  for c in cfgs))
    eps = ", ".join(dict.fromkeys(f"{c.eps:g} ({c.scale} scaling)" for c in cfgs))
    finished = [r for runs in res.runs.values() for r in runs if r.finished]
    planned = {t.name for t in plan.trainings}
    extra = sum(r.training.name not in planned for r in finished)  # further seeds found on disk (collect)
    return [f"- Models: {models}",
            f"- Data: {', '.join(dict.fromkeys(data))}; training images: {subsets}",
            f"- Training: {schedule}; augmentation: {aug}; SGD with Nesterov momentum 0.9, weight decay "
            f"{cfgs[0].weight_decay:g}; layerwise eps {eps}",
            f"- Seeds: {_per_row(plan)} planned per row; {len(finished) - extra} of {len(plan.trainings)} planned "
            f"trainings finished" + (f", and {extra} further seed(s) found" if extra else "") +
            " (a table row gives its n; an analysis states the seeds it used)",
            f"- Wall time (the logs' training seconds, evaluation excluded): {hours(train_seconds(finished))}; "
            f"hardware: {hardware(finished)}",
            provenance(res)]


def provenance(res: Results) -> str:
    """Which rows mix machines or lwat commits, and how many runs lack those records (host.json)."""
    mixed, missing = [], Counter()
    for group, runs in res.runs.items():
        done = [r for r in runs if r.finished]
        machines = {machine(r.host) for r in done if r.host}
        commits = {(r.host or {}).get("lwat") for r in done if (r.host or {}).get("lwat")}
        if len(machines) > 1 or len(commits) > 1:
            mixed.append(f"{group} ({len(machines)} machines, {len(commits)} commits)")
        for r in done:
            host = r.host or {}
            missing["machine"] += not host
            missing["lwat commit"] += not host.get("lwat")
            missing["data sha256"] += not host.get("data_sha256")
    lacking = ", ".join(f"{k} ({n})" for k, n in missing.items() if n) or "none"
    return (f"- Provenance: rows mixing machines or lwat commits: {'; '.join(mixed) or 'none'}; records that "
            f"finished runs lack (runs): {lacking}")


def _per_row(plan) -> str:
    """The planned seeds per row: "3", or "3 (5: baseline, lat)" where some rows plan more."""
    counts = Counter(t.group for t in plan.trainings)
    more = [g for g, n in counts.items() if n > plan.seeds]
    return f"{plan.seeds}" + (f" ({max(counts.values())}: {', '.join(more)})" if more else "")
