"""Beyond the paper: is lat worth it against the cheap regularizers people already use, at equal cost?

Table 3's cpu-scale VGG-16-BN (width 1/4, 10,000 CIFAR-10 training images, 30 epochs, flips, the paper's schedule
shape) trained with each regularizer at its published default, every seed paired (one initialisation, subset and
batch order per seed, whatever the method), then evaluated clean and under FGSM. Training-time ratios come from
benchmarks/regularizer_cost.py (steps of every row side by side in one process), stored as OUT/cost.json.
"""

from __future__ import annotations

import json
import math

from lwat.paper.plan import Evaluation, model, protocol
from lwat.render import claim, difference, fmt, stats, table, verdict

NAME = "regularizers"
TITLE = "Beyond the paper: lat against label smoothing, mixup, CutMix, cutout, EMA and SAM at equal cost"
SEEDS = {"smoke": 1, "cpu": 3, "paper": 3}
PAPER = {"caption": "Not in the paper: a study beyond it, of the question a practitioner asks before adding lat."}
# Attack eps of the table, pixel units of [0, 1] images: 0.02 is the paper's smallest, where this scale's baseline is
# near the floor (5.8% at 0.02, 2.5% at 0.04, seed 0); 0.005 (~1.3/255) leaves it at 35.7%, so that rows can differ.
# Chosen from the baseline's seed-0 run alone, before any other row was attacked; eval.json also keeps 0.04.
FGSM = (0.005, 0.02)
COST = "cost.json"  # benchmarks/regularizer_cost.py's output in OUT
# group -> (TrainConfig fields over the base, the row as the report names it). Published defaults: label smoothing
# 0.1 (Szegedy et al. 2016); mixup alpha 1 (Zhang et al. 2018, CIFAR-10); CutMix alpha 1 on half the batches (Yun et
# al. 2019's CIFAR recipe, cutmix_prob 0.5); cutout 16 px (DeVries and Taylor 2017, CIFAR-10); EMA decay 0.999 per
# step (a horizon of ~1,000 of the 2,340 steps); SAM rho 0.05 (Foret et al. 2021, CIFAR).
ROWS = {
    "baseline": ({"method": "baseline"}, "baseline"),
    "lat": ({"method": "lat"}, "lat, eps 10 (range scaling)"),
    "label-smoothing": ({"method": "baseline", "label_smoothing": 0.1}, "label smoothing 0.1"),
    "cutout": ({"method": "baseline", "cutout": 16}, "cutout 16 px"),
    "mixup": ({"method": "baseline", "mixup": 1.0}, "mixup, alpha 1"),
    "cutmix": ({"method": "baseline", "cutmix": 1.0, "mix_prob": 0.5}, "CutMix, alpha 1, half the batches"),
    "ema": ({"method": "baseline", "ema": 0.999}, "EMA of the weights, decay 0.999"),
    "random": ({"method": "random"}, "random signs at lat's points (control)"),
    "sam-half": ({"method": "baseline", "sam": 0.05, "half": True}, "SAM, rho 0.05, half the epochs"),
    "sam": ({"method": "baseline", "sam": 0.05}, "SAM, rho 0.05, equal epochs"),
}
# lat with each of the two best other rows (`best_others`: highest mean clean accuracy once every row has
# SEEDS["cpu"] seeds; that choice looks at the test set, so only lat+X against X is a claim, never lat+X against the
# baseline). Empty until then: the report names them, and a later session copies them here.
COMBINED: tuple[str, ...] = ()
NOT_COMBINED = ("baseline", "lat", "random")  # the reference, lat itself, and a control no one trains with
# Rows due MORE_SEEDS seeds: those whose paired clean interval against the baseline spans 0 with SEEDS["cpu"] seeds
# (`due_more_seeds` lists them in the report), and the baseline they pair with. A later session adds the rows it
# lists; those already here keep their seeds.
MORE_SEEDS = 5
DUE: tuple[str, ...] = ("baseline", "lat", "label-smoothing", "cutout", "mixup")


def fields(scale: str, device: str, group: str) -> dict:
    """The TrainConfig fields of one row ("lat+X": X's with method lat) at `scale`."""
    name = group.removeprefix("lat+")
    extra = dict(ROWS[name][0], **({"method": "lat"} if name != group else {}))
    base = {**model(scale, "vgg16_bn"), **protocol(scale, "cifar10", augment=True, device=device)}
    if extra.pop("half", False):  # half the epochs, lr / 5 at the same fractions (the last, tiniest step dropped)
        base.update(epochs=max(1, base["epochs"] // 2), lr_drop_every=max(1, base["lr_drop_every"] * 3 // 5))
    return {**base, **extra}


def groups() -> list[str]:
    return [*ROWS, *(f"lat+{g}" for g in COMBINED)]


def plan(plan, data, seeds, device):
    for group in groups():
        n = max(seeds, MORE_SEEDS) if group in DUE and seeds >= SEEDS["cpu"] else seeds
        plan.add(group, data["cifar10"], n, stem=f"regularizers-{group}", **fields(plan.scale, device, group))
        plan.evaluations.append(Evaluation(group, (0.0, *FGSM, 0.04)))
    plan.notes.append("Every method at its published default (no tuning, so no validation split); seeds pair: a "
                      "seed gives every row the same initial weights, training subset and batch order. Verdicts by "
                      "lwat.render.verdict: a 95% interval of the paired difference clear of 0, 3 seeds or more.")


def due_more_seeds(res) -> list[str]:
    """Rows with SEEDS["cpu"] or more seeds but fewer than MORE_SEEDS whose clean difference from the baseline is
    not decided: the issue's rule gives them MORE_SEEDS before 'not decided' stands."""
    base = res.by_seed("baseline")
    return [g for g in groups() if g != "baseline" and SEEDS["cpu"] <= len(res.by_seed(g)) < MORE_SEEDS
            and verdict(res.by_seed(g), base) == "not decided"]


def best_others(res) -> list[str]:
    """The two rows lat is combined with: the highest mean clean accuracy among the regularizers, once every row of
    ROWS has SEEDS["cpu"] seeds (none before)."""
    if any(len(res.by_seed(g)) < SEEDS["cpu"] for g in ROWS):
        return []
    mean = {g: stats(list(res.by_seed(g).values()))[0] for g in ROWS if g not in NOT_COMBINED}
    return sorted(mean, key=mean.get, reverse=True)[:2]


def _cost(res) -> dict:
    path = res.out / COST if res.out is not None else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def _ratio(cost: dict, group: str) -> float | None:
    row = cost.get("rows", {}).get(group)
    return row["time_ratio"] if row else None


def _cell(values: dict) -> str:
    return fmt(stats(list(values.values())), "—")


def _diff_cell(a: dict, b: dict) -> str:
    if not a or not b:
        return "—"
    diff, lo, hi, _ = difference(a, b)
    return f"{diff:+.2f} [{lo:+.2f}, {hi:+.2f}]" if lo is not None else f"{diff:+.2f} (no interval)"


def render(res) -> list[str]:
    cost, base = _cost(res), res.by_seed("baseline")
    rows = []
    for group in groups():
        mine = res.by_seed(group)
        ratio = _ratio(cost, group)
        rows.append([ROWS[group][1] if group in ROWS else f"lat + {ROWS[group[4:]][1]}", f"{len(mine)}",
                     _cell(mine), *(_cell(res.by_seed(group, eps=e)) for e in FGSM),
                     f"{ratio:.2f}x" if ratio else "—",
                     "—" if group == "baseline" else _diff_cell(mine, base),
                     "—" if group == "baseline" or not mine or not base else verdict(mine, base)])
    lines = table(["row", "n", "clean test acc %", *(f"FGSM {e:g} acc %" for e in FGSM),
                   "training time (x baseline)", "clean - baseline, points [95% CI]", "better than baseline?"], rows)
    lines += ["", "Accuracy: mean ± sample std over seeds. The difference is paired by seed (a t interval on the "
              "per-seed differences); 'not decided' where the interval spans 0 or a side has fewer than 3 seeds.",
              _cost_note(cost), ""]
    due = due_more_seeds(res)
    lines += ["**" + headline(res) + "**", ""]
    if due:
        lines += [f"Due {MORE_SEEDS} seeds before 'not decided' stands (3 leave the interval across 0): "
                  f"{', '.join(due)}{'' if set(due) <= set(DUE) else ' (add them to DUE)'}.", ""]
    best = best_others(res)
    if best:
        lines += [f"lat is combined with the two best others by mean clean accuracy: {', '.join(best)}"
                  f"{'' if set(best) == set(COMBINED) else ' (set COMBINED to them)'}.", ""]
    lines.append("Claims (each by the one rule, lwat.render.verdict):")
    lat = res.by_seed("lat")
    for group in groups():
        if group in ("baseline", "lat") or group.startswith("lat+"):
            continue
        lines.append(claim(f"lat beats {ROWS[group][1]} on clean accuracy", lat, res.by_seed(group),
                           names=("lat", group)))
    for group in groups():
        if group != "lat" and not group.startswith("lat+"):
            lines.append(claim(f"lat beats {ROWS[group][1]} under FGSM eps {FGSM[0]:g}",
                               res.by_seed("lat", eps=FGSM[0]), res.by_seed(group, eps=FGSM[0]), names=("lat", group)))
    for group in COMBINED:
        lines.append(claim(f"lat adds to {ROWS[group][1]} (lat+{group} beats {group}, clean)",
                           res.by_seed(f"lat+{group}"), res.by_seed(group), names=(f"lat+{group}", group)))
    return lines + [""]


def _cost_note(cost: dict) -> str:
    if not cost:
        return "Training time: no benchmark yet (python benchmarks/regularizer_cost.py writes OUT/cost.json)."
    return (f"Training time: the median step of each row over the baseline's, measured side by side in one process "
            f"(one run of {cost['steps']} steps each, A/A {cost['aa_ratio']:.2f}, {cost['machine']}, {cost['date']}; "
            f"`{cost['command'].strip()}`), times "
            "the row's epochs over the baseline's; evaluation excluded.")


def headline(res) -> str:
    """The study's answer in one sentence, from the verdicts alone."""
    lat, base = res.by_seed("lat"), res.by_seed("baseline")
    if not lat or not base:
        done = sum(len(res.finished(g)) for g in groups())
        return (f"Is lat worth it? Not answered yet: {done} of {len(res.plan.trainings)} planned trainings of the "
                f"study have finished, and {'lat' if not lat else 'the baseline'} has none.")
    others = [g for g in ROWS if g not in ("baseline", "lat") and res.by_seed(g)]
    beats = [g for g in others if verdict(lat, res.by_seed(g)) == "yes"]
    loses = [g for g in others if verdict(lat, res.by_seed(g)) == "no"]
    n = min(len(lat), len(base))
    cfg = res.finished("baseline")[0].config
    scale = f"{cfg.model} at width {cfg.width:g}, {_images(cfg)} training images, {cfg.epochs} epochs"
    first = {"yes": "lat beats the baseline", "no": "lat is worse than the baseline",
             "not decided": f"lat's gain over the baseline is not decided (n = {n})"}[verdict(lat, base)]
    robust = verdict(res.by_seed("lat", eps=FGSM[0]), res.by_seed("baseline", eps=FGSM[0]))
    robust = {"yes": "is more robust than the baseline", "no": "is less robust than the baseline"}.get(
        robust, "is not shown more robust than the baseline")
    versus = (f"against the other regularizers with runs ({len(others)}), lat wins {len(beats)}{_names(beats)} and "
              f"loses {len(loses)}{_names(loses)}; the rest are not decided" if others
              else "no other regularizer has a finished run yet")
    return (f"Is lat worth it? At this scale ({scale}), on clean accuracy: {first}; {versus}. Under FGSM at eps "
            f"{FGSM[0]:g}, lat {robust}.")


def _images(cfg) -> str:
    return f"{cfg.train_subset:,}" if cfg.train_subset else "all"


def _names(groups: list[str]) -> str:
    return f" ({', '.join(groups)})" if groups else ""


def draw(res, out) -> None:
    """OUT/regularizers.png: clean and FGSM accuracy (mean, 95% interval of the mean) against measured cost."""
    from scipy.stats import t

    from lwat.analysis import _plot

    cost = _cost(res)
    points = [(g, _ratio(cost, g)) for g in groups() if res.by_seed(g)]
    if not points:
        return
    fig, axes = _plot.figure(1, 2, panel=(5.6, 4.4))
    for ax, eps in zip(axes[0], (None, FGSM[0])):
        for g, ratio in points:
            mean, std, n = stats(list(res.by_seed(g, eps=eps).values())) or (math.nan, 0.0, 1)
            half = t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else 0.0
            x = ratio if ratio is not None else math.nan
            ax.errorbar([x], [mean], yerr=[half], fmt="o" if g != "lat" else "D", capsize=3,
                        color="C3" if "lat" in g else "C0")
            ax.annotate(f"{g} (n={n})", (x, mean), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.set_xlabel("training time (x baseline, measured side by side)")
        ax.set_ylabel("clean test accuracy (%)" if eps is None else f"accuracy under FGSM eps {eps:g} (%)")
        ax.set_title("clean" if eps is None else f"FGSM, eps {eps:g} (pixel units)")
        ax.grid(alpha=0.3)
    cfg = next(r.config for g, _ in points for r in res.finished(g))
    fig.suptitle(f"{cfg.model} (width {cfg.width:g}), {_images(cfg)} training images, {cfg.epochs} "
                 "epochs: mean and 95% CI of the mean over seeds (n per point)", fontsize=9)
    _plot.save(fig, out / "regularizers.png")
