"""Analyses on trained runs: the one dispatch that `lwat analyze` and `lwat reproduce` share.

Each analysis module declares what a run must provide (`NEEDS`: "log", "eval" or "model") and turns labelled runs
into its `compute` inputs (`from_runs`); this file checks the needs, loads the test data a model analysis needs, and
writes `lwat analyze`'s files.
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

from lwat.analysis import get_analysis
from lwat.config import TrainConfig, resolve_device
from lwat.experiment import load_data
from lwat.rundir import read_run

# What each need asks of a run, and what to say when a run lacks it.
WHY_NOT = {"log": "no log yet", "eval": "not evaluated yet", "model": "needs checkpoint, re-run"}


def lacks(name: str, run) -> str | None:
    """Why `run` (a `lwat.rundir.Run` or anything with its attributes) cannot go into analysis `name`, or None."""
    need = get_analysis(name).NEEDS
    has = {"log": bool(run.log), "eval": bool(run.eval), "model": run.has_checkpoint}[need]
    return None if has else WHY_NOT[need]


def test_data(cfg: TrainConfig, cache: dict | None = None):
    """(images, labels) of the test split of a run's data set (loaded once per data set when `cache` is given)."""
    key = (cfg.dataset, cfg.data_dir, cfg.grayscale)
    cache = {} if cache is None else cache
    if key not in cache:
        data = load_data(cfg.replace(train_subset=None, val_size=0))
        cache[key] = (data.test_x, data.test_y)
    return cache[key]


def compute(name: str, runs: list, *, target=None, baseline=(), device="cpu", limit: int | None = None,
            data_cfg: TrainConfig | None = None, cache: dict | None = None, **options):
    """Analysis `name` on labelled runs.

    Args:
        name: a name in `lwat.analysis.ANALYSES`.
        runs: [(label, run)] with `lwat.rundir.Run`s (or objects with their attributes); labels name plot lines.
        target: transfer: the run whose model classifies the attacked images.
        baseline: depth: runs drawn as the baseline.
        device: where models run.
        limit: model analyses: use only the first `limit` test images.
        data_cfg: the config whose test set model analyses use (default: the first run's).
        cache: test sets already loaded (see `test_data`).
        **options: keyword arguments of the analysis (eps_list, classes, ...).

    Returns:
        The analysis' result (its `compute`'s).
    """
    module = get_analysis(name)
    if not runs:
        raise ValueError(f"analyze {name}: give at least one run directory")
    if limit is not None and limit < 1:
        raise ValueError(f"analyze {name}: limit must be >= 1 (the first LIMIT test images), got {limit}")
    options.update({"target": target} if target is not None else {}, **({"baseline": baseline} if baseline else {}))
    unknown = sorted(set(options) - _options(module))
    if unknown:
        raise ValueError(f"analyze {name}: takes no option {', '.join(unknown)}")
    for run in [*(r for _, r in runs), *baseline, *([target] if target is not None else [])]:
        why = lacks(name, run)
        if why:
            raise ValueError(f"analyze {name}: {run.dir}: {why}")
    if module.NEEDS == "model":
        x, y = test_data(data_cfg or runs[0][1].config, cache)
        options.update(test=(x, y) if limit is None else (x[:limit], y[:limit]), device=device)
    return module.from_runs(runs, **options)


def _options(module) -> set[str]:
    # what an analysis takes: its from_runs's keyword-only arguments and its compute's arguments with defaults
    takes = {n for n, p in inspect.signature(module.from_runs).parameters.items() if p.kind == p.KEYWORD_ONLY}
    return takes | {n for n, p in inspect.signature(module.compute).parameters.items() if p.default is not p.empty}


def version(name: str) -> int:
    """The version of an analysis' rows: a module declares VERSION (default 1) and bumps it when its rows change
    (strength: 2, with the input_random control), so stored results of an older version are computed again."""
    return getattr(get_analysis(name), "VERSION", 1)


def report_rows(name: str, result) -> list[dict]:
    """The rows a report keeps of a result: the module's `summary_rows` where it has one, else all its rows."""
    module = get_analysis(name)
    return getattr(module, "summary_rows", module.to_rows)(result)


def analyze(name: str, runs: list, *, out=None, device: str = "auto", limit: int | None = None,
            eps: list[float] | None = None, target=None, baseline=None, classes=None) -> dict:
    """`lwat analyze`: run analysis `name` on trained run directories and write its plot and numbers.

    Args:
        name: strength, tsne (one run each); jacobian, transfer, robustness, depth, curves (several runs).
        runs: run directories.
        out: output directory (default: RUN/analysis for the first run).
        device: where models run ("auto": CUDA when present).
        limit: use only the first `limit` test images (model-based analyses).
        eps: the eps values (strength, tsne, transfer, robustness); default: the analysis' own.
        target: transfer: the run whose model classifies the attacked images (paper: the baseline).
        baseline: depth: a baseline run, drawn as a horizontal line.
        classes: tsne: the two class indices shown (default: its own, 0 and 1).

    Returns:
        {"png", "csv", "json"}: the paths written.
    """
    module = get_analysis(name)
    if not runs:
        raise ValueError(f"analyze {name}: give at least one run directory")
    paths = [Path(r).resolve() for r in runs]
    repeated = next((r for r, p in zip(runs, paths) if paths.count(p) > 1), None)
    if repeated is not None:
        raise ValueError(f"analyze {name}: run {repeated} is given more than once")
    views = [read_run(r) for r in runs]
    methods = [v.config.method for v in views]
    labelled = [(v.config.method if methods.count(v.config.method) == 1 else v.dir.name, v)
                for v in views]  # the method, or the directory where methods repeat
    options = {key: tuple(value) for key, value in (("eps_list", eps), ("classes", classes)) if value is not None}
    result = compute(name, labelled, target=read_run(target) if target else None,
                     baseline=[read_run(baseline)] if baseline else (), device=resolve_device(device), limit=limit,
                     **options)
    out = Path(out) if out is not None else Path(runs[0]) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / f"{name}.png", "csv": out / f"{name}.csv", "json": out / f"{name}.json"}
    module.plot(result, paths["png"])
    rows = module.to_rows(result)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"analysis": name, "runs": [str(r) for r in runs], "rows": rows},
                                        indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}
