"""`lwat sweep`: choose eps on held-out data, as the paper's appendix does ("cross-validated using a held-out set").

For a base config, trains the baseline (the base config with method "baseline", every other field unchanged) and
one run of the base config's layerwise method per eps, for each seed, on the training set minus a class-balanced
validation split (`TrainConfig.val_size`); picks the eps whose runs have the highest mean final validation
accuracy (test accuracy is reported for information and never used); writes OUT/sweep.json, OUT/sweep.md (a
table) and OUT/sweep.png (accuracy against eps). Runs live in OUT/runs/ and are found by their config with
`lwat.reproduce`'s run index: a finished run is reused whatever its directory is called, an unfinished one is
resumed, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from lwat.config import TrainConfig
from lwat.data import LOADERS
from lwat.methods import METHODS, get_method
from lwat.paper.plan import data_label
from lwat.models import model_options
from lwat.presets import Training
from lwat.reproduce import ensure_trained, find_run, index_runs
from lwat.render import fmt, stats, table
from lwat.rundir import LOG, METRICS, read_json, read_log, write_json

JSON, MARKDOWN, PNG = "sweep.json", "sweep.md", "sweep.png"
RULE = "highest mean final validation accuracy over the seeds (ties: the smaller eps); test accuracy is not used"


def sweep(base: TrainConfig, eps_list: Sequence[float], out, *, seeds: int = 1, train: bool = True,
          progress: str = "auto", log: Callable[[str], None] | None = None) -> dict:
    """Train (or reuse, or resume) the baseline and one run per eps and seed, choose eps on validation accuracy.

    Args:
        base: the config every run starts from: its method (layerwise, e.g. "lat") is swept over eps, and its
            val_size (> 0) is the held-out split; seeds are base.seed, base.seed + 1, ...
        eps_list: the eps values to try, each > 0, no repeats (the paper's appendix: 10, 20, 30).
        out: the sweep's folder; runs go to out/runs.
        seeds: trainings per eps (and for the baseline).
        train: False to only report what is finished under out/runs (nothing is trained or resumed).
        progress: training progress display, as `lwat.train.train`.
        log: called with one line per training (default: silent).

    Returns:
        What sweep.json holds: {"status": "finished", "incomplete" or "interrupted", "chosen_eps" (None until
        every run of some eps has finished), "rule", "method", "eps", "seeds", "baseline" and "rows" (per eps:
        mean and sample std of val and test accuracy % over the finished seeds, and each run's state and
        directory), "config" (the base config), "trainings" ({run name: outcome}), "files"}.

    Raises:
        ValueError: no validation split, a bad eps list, seeds < 1, or a method that does not use eps.
    """
    eps_list = check_sweep(base, eps_list, seeds)
    say = log or (lambda line: None)
    out = Path(out)
    root = out / "runs"
    root.mkdir(parents=True, exist_ok=True)
    seed_list = [base.seed + k for k in range(seeds)]
    groups = {"baseline": [_training(base, "baseline", None, s, train) for s in seed_list]}
    for e in eps_list:
        groups[f"eps{e:g}"] = [_training(base, base.method, e, s, train) for s in seed_list]
    order = [group[k] for k in range(seeds) for group in groups.values()]  # a whole first seed comes first
    outcomes, status, index = {}, "finished", {}
    for i, t in enumerate(order, 1):
        outcome, run = ensure_trained(t, root, index, progress=progress)
        if outcome == "no data" and not train:
            outcome = "not trained (train=False)"
        outcomes[t.name] = outcome
        say(f"[{i}/{len(order)}] {t.name}: {outcome}" + (f" ({run.name})" if run is not None else ""))
        if outcome == "interrupted":
            status = "interrupted"
            break
    index = index_runs(root)
    rows = {name: _row(group, index, out) for name, group in groups.items()}
    baseline = rows.pop("baseline")
    complete = [r for r in rows.values() if r["n"] == seeds]
    chosen = max(complete, key=lambda r: (r["val_acc"], -r["eps"]))["eps"] if complete else None
    if status == "finished" and (len(complete) < len(rows) or baseline["n"] < seeds):
        status = "incomplete"
    result = {"status": status, "chosen_eps": chosen, "rule": RULE, "method": base.method, "eps": eps_list,
              "seeds": seed_list, "baseline": baseline, "rows": list(rows.values()), "config": base.to_dict(),
              "command": command_line(base, eps_list, out, seeds), "trainings": outcomes,
              "files": {k: str(out / name) for k, name in (("json", JSON), ("markdown", MARKDOWN), ("png", PNG))}}
    write_json(out / JSON, result)
    (out / MARKDOWN).write_text(render(result))
    plot(result, out / PNG)
    return result


def check_sweep(base: TrainConfig, eps_list: Sequence[float], seeds: int) -> list[float]:
    """The eps list as floats, or ValueError naming what is wrong with the sweep's input."""
    model_options(base.model)  # an unknown model or data set fails here, before any run directory is made
    if base.dataset not in LOADERS:
        raise ValueError(f"unknown data set {base.dataset!r}; known: {', '.join(LOADERS)}")
    if base.val_size <= 0:
        raise ValueError("sweep: give a validation split (--val-size N, N > 0): eps is chosen on held-out "
                         "training images, never on the test set")
    if not get_method(base.method).layerwise:
        uses_eps = ", ".join(n for n, m in METHODS.items() if m.layerwise)
        raise ValueError(f"sweep: method {base.method!r} does not use eps; sweep one that does: {uses_eps}")
    if seeds < 1:
        raise ValueError(f"sweep: seeds must be >= 1, got {seeds}")
    values = [float(e) for e in eps_list]
    if not values:
        raise ValueError("sweep: give at least one eps")
    bad = [e for e in values if not 0 < e < math.inf]
    if bad:
        raise ValueError(f"sweep: every eps must be a finite number > 0, got {bad[0]:g}")
    labels = [f"{e:g}" for e in values]  # what names the runs and rows (eps10): values that print alike collide
    repeated = sorted({label for label in labels if labels.count(label) > 1}, key=float)
    if repeated:
        raise ValueError(f"sweep: eps {repeated[0]} is given more than once (values are told apart to 6 "
                         "significant digits)")
    return values


def command_line(base: TrainConfig, eps_list: Sequence[float], out, seeds: int = 1) -> str:
    """An `lwat sweep` command that makes this sweep: every config field that differs from its default as a flag
    (the baseline's unused eps field can only come from --config, so it is left out)."""
    parts = ["lwat sweep --eps", *map(_number, eps_list)]
    default = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(base, f.name)
        if f.name == "eps" or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, _number(value) if isinstance(value, float) else shlex.quote(str(value))]
    return " ".join(parts + ([f"--seeds {seeds}"] if seeds != 1 else []) + ["--out", shlex.quote(str(out))])


def _number(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(value)  # never rounded: the run keys would change


def _training(base: TrainConfig, method: str, eps: float | None, seed: int, available: bool) -> Training:
    changes = {"method": method, "seed": seed, **({"eps": eps} if eps is not None else {})}
    name = f"sweep-{base.model}-{method}" + (f"-eps{eps:g}" if eps is not None else "") + f"-seed{seed}"
    return Training(name, "baseline" if eps is None else f"eps{eps:g}", seed, base.replace(**changes), available)


def _row(group: list[Training], index: dict, out: Path) -> dict:
    """One table row: each seed's run as found on disk, and mean ± std over the finished ones."""
    runs = []
    for t in group:
        run, state = find_run(index, t)
        entry = {"seed": t.seed, "state": state, "dir": None if run is None else str(run.relative_to(out))}
        if state == "finished":
            metrics = read_json(run / METRICS)
            entry.update(val_acc=metrics.get("val_acc"), test_acc=metrics["test_acc"],
                         train_seconds=metrics.get("train_seconds"), device=metrics.get("device"))
        elif state == "unfinished" and (run / LOG).exists():
            entry["epochs_done"] = len(read_log(run))
        runs.append(entry)
    done = [r for r in runs if r["state"] == "finished" and r["val_acc"] is not None]
    row = {"method": group[0].config.method, "eps": None if group[0].config.method == "baseline"
           else group[0].config.eps, "n": len(done), "runs": runs}
    for key in ("val_acc", "test_acc"):
        mean, std, n = stats([100 * r[key] for r in done]) or (None, None, 0)
        row[key], row[key.replace("acc", "std")] = mean, std if n > 1 else None
    return row


def _cell(row: dict, key: str) -> str:
    std = row[key.replace("acc", "std")]
    return fmt(None if row[key] is None else (row[key], std or 0.0, row["n"]), "-")


_STATES = {"finished": "finished", "unfinished": "unfinished", "stale": "started, no checkpoint", "missing": "not run"}


def _state(row: dict) -> str:
    states = []
    for r in row["runs"]:
        state = _STATES[r["state"]] + (f" (epoch {r['epochs_done']})" if "epochs_done" in r else "")
        states.append(f"seed {r['seed']}: {state}")
    return "; ".join(states)


def render(result: dict) -> str:
    """sweep.md: the chosen eps, the table (baseline first), the scale and how eps was chosen."""
    cfg = TrainConfig.from_dict(result["config"])
    chosen, method, n = result["chosen_eps"], result["method"], len(result["seeds"])
    rows = [result["baseline"], *result["rows"]]
    complete = sum(r["n"] == n for r in result["rows"])
    lines = [f"# eps sweep: {method} on {cfg.model} (width {cfg.width:g})", ""]
    if chosen is None:
        lines.append("**No eps chosen yet**: no eps has all its runs finished.")
    else:
        partial = "" if complete == len(result["rows"]) else \
            f" (among the {complete} of {len(result['rows'])} eps values whose runs have all finished)"
        lines.append(f"**Chosen eps: {chosen:g}**{partial}, by {RULE}.")
    cells = []
    for r in rows:
        eps = "-" if r["eps"] is None else f"{r['eps']:g}"
        mark = "**" if r["eps"] is not None and r["eps"] == chosen else ""
        cells.append([f"{mark}{r['method']}{mark}", f"{mark}{eps}{mark}", _cell(r, "val_acc"), _cell(r, "test_acc"),
                      f"{r['n']} of {n}", _state(r)])
    lines += ["", *table(["run", "eps", "val acc % (chooses)", "test acc % (for information)", "finished seeds",
                          "runs"], cells)]
    data = data_label(cfg.dataset, cfg.data_dir)
    images = f"{cfg.train_subset:,} class-balanced" if cfg.train_subset else "all the remaining"
    aug = " + ".join(name for name, on in (("flip", cfg.flip), ("crop", cfg.crop)) if on) or "none"
    runs = [r for row in rows for r in row["runs"] if r["state"] == "finished"]
    hours = sum(r.get("train_seconds") or 0.0 for r in runs) / 3600
    devices = ", ".join(sorted({str(r.get("device")) for r in runs})) or "-"
    lines += ["", f"- Scale: {cfg.model} (width {cfg.width:g}{', dropout' if cfg.dropout else ''}) on {data}: "
                  f"{cfg.val_size:,} class-balanced training images held out for validation, then {images} "
                  f"training images; {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g} / "
                  f"{cfg.lr_drop_factor:g} every {cfg.lr_drop_every} epochs; augmentation: {aug}; {cfg.scale}-scaled "
                  f"eps; seeds {', '.join(map(str, result['seeds']))} (mean ± sample std over finished seeds).",
              f"- The baseline is the same config with method baseline (its eps field, {cfg.eps:g}, is unused).",
              f"- Finished trainings: {len(runs)}; training time summed from their logs: {hours:.2f} h; "
              f"devices: {devices}.",
              f"- Command: `{result['command']}`",
              f"- Status: {result['status']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """sweep.png: validation (chooses) and test (for information) accuracy against eps, baseline as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = sorted((r for r in result["rows"] if r["n"]), key=lambda r: r["eps"])
    for key, style, label in (("val_acc", "o-", "validation (chooses eps)"),
                              ("test_acc", "s--", "test (for information)")):
        if rows:
            ax.errorbar([r["eps"] for r in rows], [r[key] for r in rows],
                        yerr=[r[key.replace("acc", "std")] or 0.0 for r in rows], fmt=style, capsize=3,
                        label=f"{result['method']}: {label}")
        base = result["baseline"]
        if base["n"]:
            ax.axhline(base[key], color="gray", linestyle="-" if key == "val_acc" else "--",
                       label=f"baseline: {label.split(' ')[0]}")
    if result["chosen_eps"] is not None:
        ax.axvline(result["chosen_eps"], color="black", linestyle=":", label=f"chosen eps {result['chosen_eps']:g}")
    ax.set_xscale("log")
    ax.set_xticks(result["eps"], [f"{e:g}" for e in result["eps"]])
    ax.minorticks_off()
    ax.set_xlabel(f"eps ({result['config']['scale']} scaling)")
    ax.set_ylabel("accuracy %")
    ax.set_title(f"{result['method']} on {result['config']['model']}: mean over {len(result['seeds'])} seed(s)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

