"""Benchmark: the training-time cost of each row of the regularizers study (lwat reproduce regularizers), side by side.

Every row's training step as lwat.train runs it (its Loader batch with the row's augmentation, then `lwat.train.Step`:
the method's passes, SAM's second pass, the optimizer, the moving average), on the row's own model with the same
initial weights, takes turns with every other row in one process, in an order that rotates each round
(benchmarks/race.py), so drift in machine speed hits all alike. A second copy of the baseline gives the A/A ratio
(this run's noise). A row's training-time ratio is its median step over the baseline's, times its epochs over the
baseline's (SAM at half the epochs); per-epoch evaluation is left out. Writes the JSON the study's report reads.

    python benchmarks/regularizer_cost.py                                     # cpu scale, writes results/regularizers/cost.json
    python benchmarks/regularizer_cost.py --steps 5 --out /tmp/cost.json      # a quick check
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from lwat.data import Loader
from lwat.methods import get_method
from lwat.paper import regularizers
from lwat.presets import get_preset
from lwat.rundir import host_info, machine
from lwat.train import Step, build, make_ema, make_optimizer, make_passes
from race import race


def contender(cfg, images, labels, num_classes, base_state):
    """A call that trains one step of `cfg` as the trainer does, from its own Loader."""
    torch.manual_seed(0)
    model, handle = build(cfg, num_classes, tuple(images.shape[1:]))
    model.load_state_dict(base_state)
    ema = make_ema(model, cfg.ema) if cfg.ema else None
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = Step(get_method(cfg.method), model, handle, cfg, make_passes(model, handle,
                label_smoothing=cfg.label_smoothing), opt, scaler, ema)
    loader = Loader(images, labels, cfg.batch_size, train=True, crop=cfg.crop, flip=cfg.flip, seed=cfg.seed,
                    cutout=cfg.cutout, mixup=cfg.mixup, cutmix=cfg.cutmix, mix_prob=cfg.mix_prob,
                    num_classes=num_classes)
    batches = (b for epoch in range(10**9) for b in loader.iter_from(epoch))
    model.train()

    def call():
        x, y = next(batches)
        step.gradients(x, y)
        step.update()
    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", help="the study's scale whose configs are timed (default: cpu)")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (default: 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the study's runs)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "regularizers" / "cost.json"),
                   help="JSON written (default: the repository's results/regularizers/cost.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = get_preset(regularizers.NAME).plan(args.scale, 1, device="cpu")
    configs = {t.group: t.config for t in plan.trainings}
    base = configs["baseline"]
    n = base.train_subset or 10_000
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    state = build(base, 10, (3, 32, 32))[0].state_dict()
    calls = {group: contender(cfg, images, labels, 10, state) for group, cfg in configs.items()}
    calls["baseline again"] = contender(base, images, labels, 10, state)
    times = race(calls, args.steps, args.warmup)
    median = {k: statistics.median(v) for k, v in times.items()}
    host = host_info("cpu")
    rows = {}
    print(f"{'row':<18} {'median ms':>9} {'step ratio':>10} {'epochs':>6} {'time ratio':>10}")
    for group, cfg in configs.items():
        step_ratio = median[group] / median["baseline"]
        epochs = cfg.epochs / base.epochs
        rows[group] = {"median_ms": 1000 * median[group], "step_ratio": step_ratio, "epochs_ratio": epochs,
                       "time_ratio": step_ratio * epochs}
        print(f"{group:<18} {1000 * median[group]:>9.1f} {step_ratio:>10.2f} {epochs:>6.2f} {step_ratio * epochs:>10.2f}")
    aa = median["baseline again"] / median["baseline"]
    print(f"A/A (baseline again / baseline): {aa:.3f}; {machine(host)}")
    command = " ".join(["python benchmarks/regularizer_cost.py", *(argv or sys.argv[1:])])
    result = {"machine": machine(host), "date": datetime.date.today().isoformat(), "steps": args.steps,
              "threads": args.threads, "command": command,
              "aa_ratio": aa, "lwat": host["lwat"], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
