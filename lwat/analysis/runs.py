"""`lwat analyze NAME RUN...`: load trained runs, run one analysis, write NAME.png, NAME.csv and NAME.json.

Each analysis module computes on models and tensors; this file only turns run directories into those inputs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lwat.analysis import get_analysis
from lwat.config import TrainConfig
from lwat.train import CONFIG, load_data, load_run, read_log, resolve_device


def analyze(name: str, runs: list, *, out=None, device: str = "auto", limit: int | None = None,
            eps: list[float] | None = None, target=None, baseline=None, classes=(0, 1)) -> dict:
    """Run analysis `name` on trained runs and write its plot and numbers.

    Args:
        name: strength, tsne (one run each); jacobian, transfer, depth, curves (several runs).
        runs: run directories.
        out: output directory (default: RUN/analysis for the first run).
        device: where models run ("auto": CUDA when present).
        limit: use only the first `limit` test images (model-based analyses).
        eps: the eps values (strength, tsne, transfer); default: the paper's.
        target: transfer: the run whose model classifies the attacked images (paper: the baseline).
        baseline: depth: a baseline run, drawn as a horizontal line.
        classes: tsne: the two class indices shown.

    Returns:
        {"png", "csv", "json"}: the paths written.
    """
    module = get_analysis(name)
    if not runs:
        raise ValueError(f"analyze {name}: give at least one run directory")
    device = resolve_device(device)
    out = Path(out) if out is not None else Path(runs[0]) / "analysis"
    extra = {} if eps is None else {"eps_list": eps}
    configs = [TrainConfig.from_file(Path(r) / CONFIG) for r in runs]
    labels = [c.method if [d.method for d in configs].count(c.method) == 1 else Path(r).name
              for r, c in zip(runs, configs)]  # the method, or the directory where methods repeat
    if name == "curves":
        result = module.compute({label: read_log(r) for label, r in zip(labels, runs)})
    elif name == "depth":
        records = [{"depth": c.depth, "label": "all points" if c.depth is None else f"first {c.depth} points",
                    "accuracy": read_log(r)[-1]["test_acc"]} for r, c in zip(runs, configs)]
        result = module.compute(records, baseline=read_log(baseline)[-1]["test_acc"] if baseline else None)
    else:
        data = load_data(configs[0])
        n = len(data.test_y) if limit is None else limit
        x, y = data.test_x[:n], data.test_y[:n]
        models = {label: load_run(r, device)[0] for label, r in zip(labels, runs)}
        if name in ("strength", "tsne"):
            if len(runs) != 1:
                raise ValueError(f"analyze {name}: takes one run")
            model = next(iter(models.values()))
            result = (module.compute(model, x, y, **extra) if name == "strength"
                      else module.compute(model, x, y, classes=tuple(classes), **extra))
        elif name == "jacobian":
            result = module.compute(models, x)
        else:  # transfer
            if target is None:
                raise ValueError("analyze transfer: give --target RUN (the model that classifies)")
            result = module.compute(models, load_run(target, device)[0], x, y, **extra)
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
