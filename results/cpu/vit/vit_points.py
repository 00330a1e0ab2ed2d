"""A small ViT on CIFAR-10 at CPU scale: baseline vs lat after every LayerNorm vs lat at the default points.

Issue 13, item 6. `lwat train` attaches at the default points only and takes no points option (a new TrainConfig
field would change every run key), so this script trains with its own short loop made of lwat's pieces:
`lwat.data.load_dataset` and `Loader` (class-balanced subset and validation split, batched flips),
`lwat.models.build_model("vit")`, `lwat.attach(model, eps, points=...)` and `lwat.evaluate.robustness`. The
optimizer is what ViT users use, AdamW with a linear warm-up then cosine decay, not lwat train's SGD.

Arms (`ARMS`): baseline; lat-ln = lat with a point after every LayerNorm (2 per block + the final one, 9);
lat-default = lat at attach's default points for a model without BatchNorm (the patch embedding and every hidden
Linear, 17). Each run writes runs/ARM-epsE-seedS/ (baseline: runs/baseline-seedS/): run.json (settings),
log.jsonl (one line per epoch), metrics.json (final: validation, clean test and FGSM accuracy, seconds, machine)
and checkpoint.pt (every epoch, atomically; not committed). An unfinished run is resumed at its last epoch end;
a lock file lets two processes share the list.

    OMP_NUM_THREADS=1 nice -n 10 python results/cpu/vit/vit_points.py train --data-dir DATA \
        --arms baseline lat-ln lat-default --seeds 0 1 --eps 10
    python results/cpu/vit/vit_points.py table     # writes results/cpu/vit/TABLE.md from the small files
    python results/cpu/vit/vit_points.py scales --data-dir DATA results/cpu/vit/runs/lat-*-eps10-seed0 > scales.txt
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lwat
from lwat.data import Loader, load_dataset
from lwat.evaluate import accuracy, robustness
from lwat.models import build_model

HERE = Path(__file__).resolve().parent
ARMS = ("baseline", "lat-ln", "lat-default")
FGSM_EPS = 0.02  # pixel units of [0, 1] images
SETTINGS = {  # sized from one timed epoch (30-75 s on one thread); under heavier load runs took 8-14 min (metrics.json)
    "model": "vit", "model_options": {},  # lwat.models.vit defaults: dim 64, depth 4, 4 heads, 4x4 patches
    "dataset": "folder", "train_subset": 10_000, "val_size": 5_000,  # class-balanced; val taken first
    "flip": True, "crop": False,
    "epochs": 7, "batch_size": 128,
    "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1,  # AdamW, linear warm-up, then cosine to 0 (per step)
    "scale": "range",  # eps_l = eps * (max - min) of the cached gradient
    "fgsm_every": 2,  # FGSM on every 2nd test image (the folder is sorted by class: 500 per class); clean: all
}


def points_of(arm: str, model: nn.Module) -> list[str] | None:
    """The perturbation points of an arm: None = attach's default, or the names of every LayerNorm."""
    if arm == "lat-ln":
        return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    return None


def run_name(arm: str, eps: float, seed: int) -> str:
    return f"baseline-seed{seed}" if arm == "baseline" else f"{arm}-eps{eps:g}-seed{seed}"


def train_run(arm: str, eps: float, seed: int, data_dir: str, root: Path, log=print) -> str:
    """Train, resume or skip one run under root/; returns "finished", "trained", "resumed" or "busy"."""
    run = root / run_name(arm, eps, seed)
    if (run / "metrics.json").exists():
        return "finished"
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "run.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "busy"
        if (run / "metrics.json").exists():  # finished by another process meanwhile
            return "finished"
        return _train(arm, eps, seed, data_dir, run, log)


def _train(arm, eps, seed, data_dir, run: Path, log) -> str:
    s = SETTINGS
    data = load_dataset(s["dataset"], data_dir, train_subset=s["train_subset"], val_size=s["val_size"], seed=seed)
    torch.manual_seed(seed)
    model = build_model(s["model"], data.num_classes, in_channels=data.image_shape[0], **s["model_options"])
    handle = None if arm == "baseline" else lwat.attach(model, eps, scale=s["scale"], points=points_of(arm, model))
    loader = Loader(data.train_x, data.train_y, s["batch_size"], train=True, crop=s["crop"], flip=s["flip"],
                    seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    warmup, total = s["warmup_epochs"] * len(loader), s["epochs"] * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup))))
    settings = {**s, "arm": arm, "eps": eps, "seed": seed, "data_dir": data_dir,
                "points": handle.points if handle else [], "parameters": sum(p.numel() for p in model.parameters())}
    epoch, resumed = 0, (run / "checkpoint.pt").exists()
    if resumed:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        if handle:
            handle.load_state_dict(ckpt["cache"])
        torch.set_rng_state(ckpt["rng"])
        epoch = ckpt["epoch"]
        with open(run / "log.jsonl") as f:  # drop a line written after the checkpoint (a kill in between)
            lines = [line for line in f if line.strip()][:epoch]
        (run / "log.jsonl").write_text("".join(lines))
    else:
        _write(run / "run.json", json.dumps(settings, indent=1) + "\n")
        (run / "log.jsonl").write_text("")
    while epoch < s["epochs"]:
        model.train()
        loss_sum = correct = seen = 0
        tick = time.perf_counter()
        for x, y in loader.iter_from(epoch):
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()  # with lat, also caches the next batch's perturbation
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        seconds = time.perf_counter() - tick
        epoch += 1
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / seen,
                  "train_acc": correct / seen, "seconds": seconds, "images_per_s": seen / seconds}
        ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "cache": handle.state_dict() if handle else None, "rng": torch.get_rng_state(), "epoch": epoch}
        buffer = run / "checkpoint.pt.tmp"
        torch.save(ckpt, buffer)
        os.replace(buffer, run / "checkpoint.pt")
        with open(run / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"{run.name} " + " ".join(f"{k} {v:.4g}" for k, v in record.items()))
    if handle:
        handle.detach()  # evaluation of the plain model
    model.eval()
    tick = time.perf_counter()
    k = s["fgsm_every"]
    attacked = robustness(model, data.test_x[::k], data.test_y[::k], [FGSM_EPS])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    metrics = {"val_acc": accuracy(model, data.val_x, data.val_y), "test_acc": accuracy(model, data.test_x, data.test_y),
               f"fgsm_{FGSM_EPS:g}_acc": attacked[FGSM_EPS], "train_acc": records[-1]["train_acc"],
               "train_seconds": sum(r["seconds"] for r in records), "eval_seconds": time.perf_counter() - tick,
               "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__}}
    _write(run / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    log(f"{run.name} done: " + json.dumps({k: v for k, v in metrics.items() if k != "machine"}))
    return "resumed" if resumed else "trained"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table(root: Path) -> str:
    """Markdown: per arm and eps, mean ± std over the finished seeds of validation, clean test and FGSM accuracy."""
    rows = {}
    for path in sorted(root.glob("*/metrics.json")):
        cfg = json.loads((path.parent / "run.json").read_text())
        rows.setdefault((ARMS.index(cfg["arm"]), 0.0 if cfg["arm"] == "baseline" else cfg["eps"]), []).append(
            (cfg, json.loads(path.read_text())))
    fgsm = f"fgsm_{FGSM_EPS:g}_acc"

    def stat(runs, key):
        values = [100 * m[key] for _, m in runs]
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.1f}{spread}"

    parameters = next(iter(rows.values()))[0][0]["parameters"]
    lines = ["| arm | points | eps | seeds | val acc % | clean test acc % | FGSM 0.02 test acc % | train acc % | "
             "min per run |", "|---|---|---|---|---|---|---|---|---|"]
    for (arm_index, eps), runs in sorted(rows.items()):
        cfg = runs[0][0]
        points = f"{len(cfg['points'])}" if cfg["points"] else "none"
        minutes = statistics.mean(m["train_seconds"] + m["eval_seconds"] for _, m in runs) / 60
        lines.append(f"| {cfg['arm']} | {points} | {'-' if cfg['arm'] == 'baseline' else f'{eps:g}'} | "
                     f"{','.join(str(c['seed']) for c, _ in runs)} | {stat(runs, 'val_acc')} | {stat(runs, 'test_acc')} | "
                     f"{stat(runs, fgsm)} | {stat(runs, 'train_acc')} | {minutes:.1f} |")
    s = SETTINGS
    return "\n".join([
        "# ViT on CIFAR-10 (JPEG q75 copy): baseline vs lat after every LayerNorm vs lat at the default points", "",
        f"lwat.models.vit defaults ({parameters:,} parameters: dim 64, 4 blocks, 4 heads, 4x4 "
        f"patches), {s['train_subset']:,} class-balanced training images, {s['val_size']:,} held-out validation "
        f"images (per seed), {s['epochs']} epochs of batch {s['batch_size']}, AdamW lr {s['lr']:g} (1 warm-up "
        f"epoch, cosine), weight decay {s['weight_decay']:g}, flips, range-scaled eps. Mean ± sample std over the "
        "seeds listed; FGSM at eps 0.02 in pixel units of [0, 1] images, on every 2nd test image (5,000, 500 per "
        "class); train acc on the perturbed activations (last epoch). One thread per run, two runs side by side, on "
        "a shared 2-core CPU VM (load average 8-10); min per run = training + evaluation.", "",
        *lines, "",
        "Regenerate: `python results/cpu/vit/vit_points.py table`. Train: see the script's docstring.", ""])


def scales(run: Path, data_dir: str) -> str:
    """How strong the final cache's perturbation is at each point of a finished lat run: eps_l against the RMS of
    the point's clean activation on 128 training images (the relative size of Eq. 6's addition)."""
    cfg = json.loads((run / "run.json").read_text())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    data = load_dataset(cfg["dataset"], data_dir, train_subset=cfg["train_subset"], val_size=cfg["val_size"],
                        seed=cfg["seed"])
    model = build_model(cfg["model"], data.num_classes, in_channels=data.image_shape[0], **cfg["model_options"])
    model.load_state_dict(ckpt["model"])
    modules, rms = dict(model.named_modules()), {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: rms.__setitem__(n, o.pow(2).mean().sqrt().item()))
             for n in ckpt["cache"]]
    with torch.no_grad():
        model.eval()(data.train_x[:128].float() / 255)
    for h in hooks:
        h.remove()
    lines = [f"{run.name}: eps {cfg['eps']:g}, {len(rms)} points", "point  eps_l  activation RMS  eps_l / RMS"]
    for n, state in ckpt["cache"].items():
        eps_l = state["scale"].item()
        lines.append(f"{n}  {eps_l:.3g}  {rms[n]:.3g}  {eps_l / rms[n]:.2%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume, or skip when finished) every listed run, one at a time")
    p.add_argument("--data-dir", required=True, help="cifar10-jpeg.tar.gz")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eps", type=float, nargs="+", default=[10.0], help="range-scaled eps of the lat arms")
    p.add_argument("--root", type=Path, default=HERE / "runs")
    p = sub.add_parser("table", help="write TABLE.md beside this script from the finished runs")
    p.add_argument("--root", type=Path, default=HERE / "runs")
    p = sub.add_parser("scales", help="print eps_l against the activations' RMS at every point of finished runs "
                                      "(needs their checkpoint.pt)")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--data-dir", required=True, help="cifar10-jpeg.tar.gz")
    args = parser.parse_args()
    if args.command == "scales":
        print("\n\n".join(scales(run, args.data_dir) for run in args.runs))
        return
    if args.command == "table":
        text = table(args.root)
        (HERE / "TABLE.md").write_text(text)
        print(text)
        return
    jobs = [(arm, eps, seed) for seed in args.seeds for arm in args.arms
            for eps in ([0.0] if arm == "baseline" else args.eps)]
    for arm, eps, seed in dict.fromkeys(jobs):
        start = time.time()
        outcome = train_run(arm, eps, seed, args.data_dir, args.root, log=lambda line: print(line, flush=True))
        print(f"## {time.strftime('%H:%M:%S')} {run_name(arm, eps, seed)}: {outcome} ({time.time() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
