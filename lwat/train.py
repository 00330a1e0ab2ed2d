"""One method-agnostic training loop: build, step, checkpoint, resume bit-exact, stop on signals, log.

What a run directory holds and how it is written (atomic files, a checkpoint at every epoch end and on SIGINT/SIGTERM
at the next step boundary, the previous checkpoint kept) is `lwat.rundir`'s; this file only calls it.
The loop knows nothing about methods beyond `lwat.methods.Method`: what is perturbed happens in the model
(lwat.attach) and in the method's step, which runs its passes through the `Passes` the loop gives it (autocast,
loss scaling, DDP). Scale: --amp bf16/fp16, --channels-last, --compile, and torchrun for several processes
(`torchrun --nproc_per_node N -m lwat train ...`; across nodes add torchrun's --nnodes/--rdzv-* flags).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import lwat
from lwat import rundir
from lwat.config import ConfigError, TrainConfig, resolve_device
from lwat.data import LOADERS, Loader, load_dataset
from lwat.evaluate import accuracy
from lwat.methods import Passes, get_method
from lwat.models import build_model, model_options
from lwat.rundir import CONFIG

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.amp -> autocast dtype


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says why and what was kept."""


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
        handle = lwat.attach(model, cfg.eps, scale=cfg.scale, depth=cfg.depth, direction=method.direction,
                             kernels=cfg.kernels)
    return model, handle


def load_data(cfg: TrainConfig):
    return load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, grayscale=cfg.grayscale,
                        train_subset=cfg.train_subset, val_size=cfg.val_size, seed=cfg.seed)


def make_passes(model, handle=None, *, amp: str = "off", device_type: str = "cpu", scaler=None,
                label_smoothing: float = 0.0) -> Passes:
    """The forward context and backward a method's step runs its passes with (`lwat.methods.Passes`).

    Args:
        model: what the step calls: the model, or its DistributedDataParallel wrapper (then a pass marked
            forward(sync=False) skips the gradient all-reduce, left to the step's last backward).
        handle: the model's lwat handle, or None. With an enabled scaler its grad_scale is set to the loss
            scale before each backward, so the cache's eps_l comes from the unscaled gradient.
        amp: "off", "bf16" or "fp16": the autocast dtype of forward passes and losses (never of backward).
        device_type: "cpu" or "cuda" (autocast's device).
        scaler: a torch.amp.GradScaler (enabled for fp16), or None.
        label_smoothing: of the training loss, the cross-entropy.

    Returns:
        A `Passes`.
    """
    dtype = AMP_DTYPES[amp]
    ddp = isinstance(model, DistributedDataParallel)

    @contextlib.contextmanager
    def forward(sync: bool = True):
        with contextlib.ExitStack() as stack:
            if dtype is not None:
                stack.enter_context(torch.autocast(device_type, dtype))
            if ddp and not sync:  # DDP decides in forward whether this pass's backward all-reduces
                stack.enter_context(model.no_sync())
            yield

    def backward(loss: torch.Tensor) -> None:
        if scaler is None or not scaler.is_enabled():
            loss.backward()
            return
        if handle is not None:
            handle.grad_scale = scaler.scale(loss.new_ones(()))  # the loss scale, as a tensor: no host sync
        scaler.scale(loss).backward()

    return Passes(forward, backward, functools.partial(F.cross_entropy, label_smoothing=label_smoothing))


def train(cfg: TrainConfig, out, *, resume: bool = False, progress: str = "auto",
          stop_after_steps: int | None = None) -> dict:
    """Train (or continue training) one run in directory `out` (`lwat.rundir`), in this process or, under torchrun,
    in all of them (DDP).

    Under torchrun (WORLD_SIZE > 1 in the environment, or a process group initialized already) every process
    trains a DistributedDataParallel replica: gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK. Each global
    batch of the loader (batch_size x WORLD_SIZE images, deterministic from seed and epoch) is split in rank
    order, batch_size images per process. Each process keeps its own perturbation cache from its own previous
    batch (never broadcast, as in the paper); the checkpoint holds every rank's cache and RNG state, so a resume
    with the same number of processes is exact. Rank 0 alone writes the run directory; on resume every rank
    reads it (across nodes: a file system all nodes share).

    Args:
        cfg: the configuration (with resume=True it must equal the run's saved config).
        out: the run directory; created if missing. Without resume it must not hold a run already.
        resume: continue from out's newest readable checkpoint (`lwat.rundir.resume_checkpoint`), bit-exact on CPU.
        progress: "bar" (tqdm), "lines" (one line per epoch on stdout), "none", or "auto" (bar on a terminal).
        stop_after_steps: behave as if interrupted after this many steps of this call (for tests).

    Returns:
        The final metrics (also in metrics.json), or {"status": "interrupted", ...} when stopped early;
        the same on every rank.
    """
    out = Path(out)
    method = get_method(cfg.method)
    if cfg.dataset not in LOADERS:
        raise ConfigError(f"unknown data set {cfg.dataset!r}; known: {', '.join(LOADERS)}")
    model_options(cfg.model)  # unknown model: error before anything is written
    if cfg.sam and method.passes != 1:
        raise ConfigError(f"sam: combines with the one-pass methods (baseline, lat, random), not {cfg.method}")
    if resume:
        saved = TrainConfig.from_file(out / CONFIG)
        if saved.replace(device=cfg.device) != cfg:  # the device may change, e.g. CPU -> GPU
            raise ConfigError(f"{out}: --resume continues the run with its saved config; it differs from the one given")
        if not rundir.has_checkpoint(out):
            raise ConfigError(f"{out}: no {rundir.CHECKPOINT} to resume from")
    with _process_group(cfg.device) as (rank, world, device), \
            rundir.claim(out, resume=resume) if rank == 0 else contextlib.nullcontext():  # rank 0 writes the run
        # In a function of its own, so the DDP wrapper is gone before the process group is destroyed.
        return _train(cfg, out, method=method, resume=resume, progress=progress, stop_after_steps=stop_after_steps,
                      rank=rank, world=world, device=device)


def _train(cfg, out, *, method, resume, progress, stop_after_steps, rank, world, device) -> dict:
    data = load_data(cfg).to(device)
    torch.manual_seed(cfg.seed)
    model, handle = build(cfg, data.num_classes, data.image_shape)  # the same weights on every rank
    if world > 1:  # each rank its own dropout masks and random signs
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    ema = make_ema(model, cfg.ema) if cfg.ema else None  # before compiling: the copy is an eager module
    if cfg.compile:
        model.compile()  # in place: the attached root module itself, so lwat can drop its split first-step code
    stepped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model  # attached before wrapping: the caches are plain attributes, never broadcast
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_drop_every, gamma=1 / cfg.lr_drop_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    run = make_passes(stepped, handle, amp=cfg.amp, device_type=device.type, scaler=scaler,
                      label_smoothing=cfg.label_smoothing)
    # The global batch (the same on every rank); each rank gathers and augments only its own rows of it.
    loader = Loader(data.train_x, data.train_y, cfg.batch_size * world, train=True, crop=cfg.crop,
                    flip=cfg.flip, seed=cfg.seed, channels_last=cfg.channels_last,
                    rows=slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size), cutout=cfg.cutout,
                    mixup=cfg.mixup, cutmix=cfg.cutmix, mix_prob=cfg.mix_prob, num_classes=data.num_classes)
    epoch, start, sums = 0, 0, _new_sums()
    if resume:
        ckpt = rundir.resume_checkpoint(out)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # saved by an enabled (fp16) scaler
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        epoch, start, sums = ckpt["epoch"], ckpt["batch"], ckpt["sums"]
        mine = _rank_state(ckpt, rank, world, out)
        if handle is not None:
            handle.load_state_dict(_to(mine["perturbation"], device))
        _set_rng(mine["rng"], device)
        if rank == 0:
            rundir.truncate_log(out, epoch)  # epochs logged after this checkpoint are trained again
    elif rank == 0:
        rundir.write_json(out / CONFIG, cfg.to_dict())
    if rank == 0:
        rundir.write_host(out, cfg)
    meta = {"num_classes": data.num_classes, "image_shape": list(data.image_shape), "classes": data.classes}

    def save(epoch, batch, sums):
        mine = {"perturbation": _to(handle.state_dict(), "cpu") if handle is not None else None,
                "rng": _get_rng(device)}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world if rank == 0 else None
            dist.gather_object(mine, ranks, dst=0)
        if rank == 0:
            rundir.save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                                    **({"ema": ema.state_dict()} if ema is not None else {}),
                                    "perturbation": ranks[0]["perturbation"], "rng": ranks[0]["rng"],
                                    **({"ranks": ranks} if world > 1 else {}), "world_size": world,
                                    "epoch": epoch, "batch": batch, "sums": sums, "config": cfg.to_dict(),
                                    "data": meta}, out)

    step = Step(method, stepped, handle, cfg, run, opt, scaler, ema, model)
    mode = ("bar" if sys.stderr.isatty() else "lines") if progress == "auto" else progress
    mode = mode if rank == 0 else "none"
    steps_done = 0
    with _stop_on_signals() as stop:
        while epoch < cfg.epochs:
            stepped.train()
            bar = tqdm(total=len(loader), initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=mode != "bar", leave=False, dynamic_ncols=True)
            tick = time.perf_counter()
            for batch, (x, y) in enumerate(loader.iter_from(epoch, start), start=start):
                loss, logits = step.gradients(x, y)
                labels = y.argmax(1) if y.ndim == 2 else y  # mixup, CutMix: the larger share
                # One host sync per step, one all-reduce under DDP: summed loss, correct, and any rank stopping.
                stats = torch.stack([loss.float() * len(y), (logits.argmax(1) == labels).sum().float(),
                                     loss.new_tensor(float(stop.is_set()))])
                if world > 1:
                    dist.all_reduce(stats)
                loss_sum, correct, stopping = stats.tolist()
                if not math.isfinite(loss_sum):
                    raise _non_finite(loss_sum, epoch, batch, out, rank)
                step.update()
                sums["loss"] += loss_sum
                sums["correct"] += round(correct)
                sums["images"] += len(y) * world
                now = time.perf_counter()
                sums["seconds"] += now - tick
                tick = now
                bar.update()
                bar.set_postfix(loss=f"{sums['loss'] / sums['images']:.3f}",
                                acc=f"{sums['correct'] / sums['images']:.3f}",
                                img_s=f"{sums['images'] / sums['seconds']:.0f}")
                steps_done += 1
                if stopping or steps_done == stop_after_steps:
                    bar.close()
                    save(epoch, batch + 1, sums)
                    return {"status": "interrupted", "epoch": epoch, "batch": batch + 1, "run_dir": str(out)}
            bar.close()
            if world > 1:  # every rank gets rank 0's BatchNorm statistics: the model is then the same everywhere
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            tested = model if ema is None else ema.module  # what the run yields
            record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                      "train_loss": sums["loss"] / sums["images"], "train_acc": sums["correct"] / sums["images"],
                      "test_acc": _accuracy(tested, data.test_x, data.test_y, cfg.eval_batch_size, world, device),
                      "seconds": sums["seconds"], "images_per_s": sums["images"] / sums["seconds"]}
            if data.val_x is not None:
                record["val_acc"] = _accuracy(tested, data.val_x, data.val_y, cfg.eval_batch_size, world, device)
            with warnings.catch_warnings():  # resumed after an epoch's last step: no optimizer step in this process
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
                sched.step()
            epoch, start, sums = epoch + 1, 0, _new_sums()
            if rank == 0:
                rundir.append_log(out, record)
            save(epoch, 0, sums)
            if mode == "lines":
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
            if _any_rank(stop.is_set(), world, device):
                return {"status": "interrupted", "epoch": epoch, "batch": 0, "run_dir": str(out)}
    metrics = None
    if rank == 0:
        metrics = {**rundir.summarize(rundir.read_log(out), cfg, method.passes * (2 if cfg.sam else 1)), "world_size": world}
        rundir.write_json(out / rundir.METRICS, metrics)
        rundir.drop_previous(out)
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper's), or SAM / adaptive SAM over it (pytorch-optimizer) when cfg.sam."""
    sgd = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if not cfg.sam:
        return torch.optim.SGD(model.parameters(), **sgd)
    try:
        from pytorch_optimizer import SAM
    except ImportError:
        raise ConfigError('sam: needs pytorch-optimizer (pip install "lwat[experiments]")') from None
    return SAM(model.parameters(), torch.optim.SGD, rho=cfg.sam, adaptive=cfg.sam_adaptive, **sgd)


def make_ema(model, decay: float):
    """An exponential moving average of the model's weights and buffers (BatchNorm statistics), updated per step:
    avg = decay * avg + (1 - decay) * weights (the first update copies). Its `.module` is a copy of the model (an
    attached model's copy is the plain model in eval mode)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@dataclass(frozen=True)
class Step:
    """One training step as the loop runs it, in two halves around the loss check: `gradients` (the method's
    passes, twice under SAM) and `update` (the optimizer, through the fp16 GradScaler or SAM's second step, then the
    moving average). Benchmarks time exactly this."""

    method: object  # lwat.methods.Method
    model: torch.nn.Module  # what the passes call (the DDP wrapper under torchrun)
    handle: object  # the lwat handle, or None
    cfg: TrainConfig
    run: Passes
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: object = None  # make_ema's AveragedModel, or None
    net: torch.nn.Module | None = None  # the model the average follows (inside the DDP wrapper); default `model`

    def gradients(self, x, y):
        """The parameters' .grad for batch (x, y) (zeroed first); returns the (loss, logits) to log."""
        self.opt.zero_grad(set_to_none=True)
        if self.cfg.sam:
            return sam_step(self.method, self.model, self.handle, x, y, self.cfg, self.run, self.opt)
        return self.method.step(self.model, self.handle, x, y, self.cfg, self.run)

    def update(self) -> None:
        if self.cfg.sam:
            self.opt.second_step()  # back to w, then SGD with the gradient at w + e
        else:
            self.scaler.step(self.opt)  # opt.step(), unless an fp16 gradient overflowed (then skipped)
            self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.net if self.net is not None else self.model)


def sam_step(method, model, handle, x, y, cfg, run, opt):
    """SAM's two passes (Foret et al. 2021): the method's step at w, opt.first_step to w + e, the method's step again
    there; the caller then calls opt.second_step(). BatchNorm statistics are updated by the first pass only (as in
    the SAM authors' code). With lat, both passes are perturbed with the previous step's signs, and the cache is
    refreshed by the second pass, whose gradient makes the update. Returns the first pass's (loss, logits)."""
    from pytorch_optimizer.optimizer.utils import disable_running_stats, enable_running_stats

    capture = handle is not None and handle.capture
    if handle is not None:
        handle.capture = False
    try:
        loss, logits = method.step(model, handle, x, y, cfg, run)
    finally:
        if handle is not None:
            handle.capture = capture
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    try:
        method.step(model, handle, x, y, cfg, run)
    finally:
        enable_running_stats(model)
    return loss, logits


def _non_finite(loss_sum: float, epoch: int, batch: int, out: Path, rank: int) -> TrainingError:
    where = f"non-finite loss ({loss_sum}) at epoch {epoch + 1}, batch {batch + 1}; stopped"
    if rundir.has_checkpoint(out):
        return TrainingError(f"{where}. The last good checkpoint is kept in {out} (a resume repeats the same steps: "
                             "train again with a smaller lr or eps)")
    if rank == 0:
        rundir.discard_start(out)
    return TrainingError(f"{where} before the first checkpoint: nothing was kept, and {out} can be trained again "
                         "(try a smaller lr or eps)")


def _new_sums():
    return {"loss": 0.0, "correct": 0, "images": 0, "seconds": 0.0}


def _get_rng(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":  # this process's device only: touching the others would make a context on each
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        torch.cuda.set_rng_state((cuda[device.index or 0] if isinstance(cuda, list) else cuda).cpu(), device)


def _rank_state(ckpt: dict, rank: int, world: int, out: Path) -> dict:
    """This rank's perturbation cache and RNG state in a checkpoint written by any number of processes."""
    states = ckpt.get("ranks") or [{"perturbation": ckpt["perturbation"], "rng": ckpt["rng"]}]
    if len(states) != world and ckpt["batch"] != 0:
        raise ConfigError(f"{out}: the checkpoint was written mid-epoch by {len(states)} process(es), and the "
                          f"split of the epoch into global batches depends on that number: resume with as many, "
                          f"not {world}")
    return states[rank % len(states)]  # another number of processes, at an epoch end: saved states are reused


def _to(cache: dict, device) -> dict:
    return {name: {k: None if v is None else v.to(device) for k, v in point.items()} for name, point in cache.items()}


@contextlib.contextmanager
def _process_group(device_name: str):
    """Yields (rank, world size, device). Under torchrun (WORLD_SIZE > 1) it joins the process group for the
    run: gloo on CPU, nccl on CUDA with this process on cuda:LOCAL_RANK; a group initialized already is used."""
    joined = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        yield 0, 1, device
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index not in (None, local_rank):
            raise ConfigError(f"device: under torchrun each process uses cuda:LOCAL_RANK (here cuda:{local_rank}); "
                              f"give --device cuda or auto, not {device_name}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not joined:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    try:
        dist.barrier()  # every rank has checked what --resume needs before rank 0 writes anything
        yield dist.get_rank(), world, device
        dist.barrier()  # and none returns before rank 0 has written everything (a resume may follow at once)
    finally:
        if not joined:
            gc.collect()  # the run's DDP wrapper must be gone first: destroyed after the group, it can hang
            dist.destroy_process_group()


def _any_rank(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t)
    return t.item() > 0


def _accuracy(model, x, y, batch_size: int, world: int, device) -> float:
    if world == 1:
        return accuracy(model, x, y, batch_size=batch_size)
    part = slice(dist.get_rank(), None, world)  # each rank measures every world-th image; the counts are summed
    n = len(y[part])
    correct = round(accuracy(model, x[part], y[part], batch_size=batch_size) * n) if n else 0
    total = torch.tensor(float(correct), device=device)
    dist.all_reduce(total)
    return total.item() / len(y)


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
