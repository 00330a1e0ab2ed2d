"""One method-agnostic training loop: run directories, atomic checkpoints, bit-exact resume, signals, logs.

A run directory holds
    config.json      the full resolved TrainConfig
    log.jsonl        one line per epoch: train loss/accuracy (on the perturbed activations), test (and val)
                     accuracy, lr, seconds, images/s
    metrics.json     the final metrics, written when the run completes
    checkpoint.pt    model, optimizer, scheduler, perturbation cache, RNG states, epoch and batch; written
                     atomically at every epoch end and on SIGINT/SIGTERM (at the next step boundary)
The loop knows nothing about methods beyond `lwat.methods.Method`: what is perturbed happens in the model
(lwat.attach) and in the method's step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lwat
from lwat.config import ConfigError, TrainConfig
from lwat.data import LOADERS, Loader, load_dataset
from lwat.evaluate import accuracy, robustness
from lwat.methods import get_method
from lwat.models import build_model, model_options

CONFIG, LOG, METRICS, CHECKPOINT = "config.json", "log.jsonl", "metrics.json", "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says why and what was kept."""


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available")
    return device


def build(cfg: TrainConfig, num_classes: int, image_shape: tuple[int, int, int]):
    """The model of `cfg` (fresh weights from the global RNG) and its lwat handle (None for input-space methods)."""
    method = get_method(cfg.method)
    accepted = model_options(cfg.model)
    options = {"in_channels": image_shape[0]}
    if "image_size" in accepted:
        options["image_size"] = image_shape[1]
    if cfg.width != 1.0:
        options["width"] = cfg.width
    if cfg.dropout or "dropout" in accepted:
        options["dropout"] = cfg.dropout
    model = build_model(cfg.model, num_classes, **options)
    handle = None
    if method.layerwise:
        handle = lwat.attach(model, cfg.eps, scale=cfg.scale, depth=cfg.depth, direction=method.direction)
    return model, handle


def load_data(cfg: TrainConfig):
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, grayscale=cfg.grayscale,
                        train_subset=cfg.train_subset, val_size=cfg.val_size, seed=cfg.seed)


def train(cfg: TrainConfig, out, *, resume: bool = False, progress: str = "auto",
          stop_after_steps: int | None = None) -> dict:
    """Train (or continue training) one run.

    Args:
        cfg: the configuration (with resume=True it must equal the run's saved config).
        out: the run directory; created if missing. Without resume it must not hold a run already.
        resume: continue from out/checkpoint.pt, bit-exact on CPU.
        progress: "bar" (tqdm), "lines" (one line per epoch on stdout), "none", or "auto" (bar on a terminal).
        stop_after_steps: behave as if interrupted after this many steps of this call (for tests).

    Returns:
        The final metrics (also in metrics.json), or {"status": "interrupted", ...} when stopped early.
    """
    out = Path(out)
    method = get_method(cfg.method)
    if cfg.dataset not in LOADERS:
        raise ConfigError(f"unknown data set {cfg.dataset!r}; known: {', '.join(LOADERS)}")
    model_options(cfg.model)  # unknown model: error before anything is written
    if resume:
        saved = TrainConfig.from_file(out / CONFIG)
        if saved.replace(device=cfg.device) != cfg:  # the device may change, e.g. CPU -> GPU
            raise ConfigError(f"{out}: --resume continues the run with its saved config; it differs from the one given")
        if not (out / CHECKPOINT).exists():
            raise ConfigError(f"{out}: no {CHECKPOINT} to resume from")
    elif (out / CONFIG).exists():
        raise ConfigError(f"{out} already holds a run; use --resume {out} or another --out")
    device = resolve_device(cfg.device)
    data = load_data(cfg).to(device)
    torch.manual_seed(cfg.seed)
    model, handle = build(cfg, data.num_classes, data.image_shape)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_drop_every, gamma=1 / cfg.lr_drop_factor)
    loader = Loader(data.train_x, data.train_y, cfg.batch_size, train=True, crop=cfg.crop, flip=cfg.flip,
                    seed=cfg.seed, channels_last=cfg.channels_last)
    epoch, start, sums = 0, 0, _new_sums()
    if resume:
        ckpt = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if handle is not None:
            handle.load_state_dict(ckpt["perturbation"])
        _set_rng(ckpt["rng"])
        epoch, start, sums = ckpt["epoch"], ckpt["batch"], ckpt["sums"]
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / CONFIG, cfg.to_dict())
    meta = {"num_classes": data.num_classes, "image_shape": list(data.image_shape), "classes": data.classes}

    def save(epoch, batch, sums):
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "perturbation": handle.state_dict() if handle is not None else None, "rng": _get_rng(),
                      "epoch": epoch, "batch": batch, "sums": sums, "config": cfg.to_dict(), "data": meta},
                     out / CHECKPOINT)

    mode = ("bar" if sys.stderr.isatty() else "lines") if progress == "auto" else progress
    steps_done = 0
    with _stop_on_signals() as stop:
        while epoch < cfg.epochs:
            model.train()
            bar = tqdm(total=len(loader), initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=mode != "bar", leave=False, dynamic_ncols=True)
            tick = time.perf_counter()
            for batch, (x, y) in enumerate(loader.iter_from(epoch, start), start=start):
                opt.zero_grad(set_to_none=True)
                loss, logits = method.step(model, handle, x, y, cfg)
                loss = loss.item()
                if not math.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({loss}) at epoch {epoch + 1}, batch {batch + 1}; stopped. "
                                        f"The last good checkpoint is kept in {out} (try a smaller lr or eps)")
                opt.step()
                sums["loss"] += loss * len(y)
                sums["correct"] += (logits.argmax(1) == y).sum().item()
                sums["images"] += len(y)
                now = time.perf_counter()
                sums["seconds"] += now - tick
                tick = now
                bar.update()
                bar.set_postfix(loss=f"{sums['loss'] / sums['images']:.3f}",
                                acc=f"{sums['correct'] / sums['images']:.3f}",
                                img_s=f"{sums['images'] / sums['seconds']:.0f}")
                steps_done += 1
                if stop.is_set() or steps_done == stop_after_steps:
                    bar.close()
                    save(epoch, batch + 1, sums)
                    return {"status": "interrupted", "epoch": epoch, "batch": batch + 1, "run_dir": str(out)}
            bar.close()
            record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                      "train_loss": sums["loss"] / sums["images"], "train_acc": sums["correct"] / sums["images"],
                      "test_acc": accuracy(model, data.test_x, data.test_y, batch_size=cfg.eval_batch_size),
                      "seconds": sums["seconds"], "images_per_s": sums["images"] / sums["seconds"]}
            if data.val_x is not None:
                record["val_acc"] = accuracy(model, data.val_x, data.val_y, batch_size=cfg.eval_batch_size)
            sched.step()
            epoch, start, sums = epoch + 1, 0, _new_sums()
            with open(out / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            save(epoch, 0, sums)
            if mode == "lines":
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
            if stop.is_set():
                return {"status": "interrupted", "epoch": epoch, "batch": 0, "run_dir": str(out)}
    metrics = summarize(read_log(out), cfg, method.passes)
    _write_json(out / METRICS, metrics)
    return metrics


def summarize(log: list[dict], cfg: TrainConfig, passes: int) -> dict:
    """Final metrics of a finished run from its per-epoch log."""
    last = log[-1]
    seconds = sum(r["seconds"] for r in log)
    images = sum(r["images_per_s"] * r["seconds"] for r in log)
    metrics = {"status": "finished", "method": cfg.method, "model": cfg.model, "epochs": len(log),
               "test_acc": last["test_acc"], "best_test_acc": max(r["test_acc"] for r in log),
               "train_acc": last["train_acc"], "train_loss": last["train_loss"],
               "train_seconds": seconds, "images_per_s": images / seconds, "passes_per_step": passes,
               "device": str(resolve_device(cfg.device)), "torch": torch.__version__}
    if "val_acc" in last:
        metrics["val_acc"] = last["val_acc"]
    return metrics


def read_log(run_dir) -> list[dict]:
    with open(Path(run_dir) / LOG) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(path, device="cpu"):
    """A trained model (plain, eval mode, on `device`) and its config, from a run directory or checkpoint file.

    Returns:
        (model, cfg, meta) with meta = {"num_classes", "image_shape", "classes"}.
    """
    path = Path(path)
    ckpt_path = path / CHECKPOINT if path.is_dir() else path
    if not ckpt_path.is_file():
        raise ConfigError(f"{path}: no run directory or checkpoint file there")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cfg, meta = TrainConfig.from_dict(ckpt["config"]), ckpt["data"]
    except (RuntimeError, KeyError, EOFError) as e:
        raise ConfigError(f"{ckpt_path}: not an lwat checkpoint ({e})") from None
    model, handle = build(cfg.replace(method="baseline"), meta["num_classes"], tuple(meta["image_shape"]))
    model.load_state_dict(ckpt["model"])  # attach leaves the keys alone: the plain model takes the weights
    return model.to(device).eval(), cfg, meta


def evaluate_run(path, *, eps_list=(0.0, 0.02, 0.04, 0.06, 0.08, 0.1), attack: str = "fgsm", device="auto",
                 batch_size: int = 500, data_dir=None) -> dict:
    """Clean and attacked test accuracy of a trained run; written as eval.json beside its checkpoint.

    Args:
        path: run directory or checkpoint file.
        eps_list: attack radii, pixel units of [0, 1] images (0 = clean).
        attack: "fgsm" or "pgd".
        device: where to evaluate ("auto": CUDA when present).
        batch_size: images per batch.
        data_dir: the data's location if it moved since training.

    Returns:
        {"accuracy": {eps as text: fraction}, "attack", "path" (of eval.json), "run"}.
    """
    device = resolve_device(device)
    model, cfg, _ = load_run(path, device)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=str(data_dir))
    data = load_data(cfg)
    acc = robustness(model, data.test_x, data.test_y, eps_list, attack=attack, batch_size=batch_size,
                     progress=sys.stderr.isatty())
    path = Path(path)
    out = (path if path.is_dir() else path.parent) / "eval.json"
    result = {"run": str(path), "attack": attack, "accuracy": {f"{e:g}": a for e, a in acc.items()}}
    _write_json(out, result)
    return {**result, "path": str(out)}


def _new_sums():
    return {"loss": 0.0, "correct": 0, "images": 0, "seconds": 0.0}


def _get_rng():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state):
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _atomic_save(obj, path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _stop_on_signals():
    """Yields an Event set by SIGINT/SIGTERM; the loop checks it at step boundaries and saves."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
