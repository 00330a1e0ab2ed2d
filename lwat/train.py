"""One method-agnostic training loop: build, step, checkpoint, resume bit-exact, stop on signals, log.

`train` reads as the loop it is: `_setup` (data, model, optimizer, loader: built by `lwat.experiment`), `_resume`,
then epochs of `_train_epoch` and `_end_epoch`, each ended by `_save_checkpoint`, and `_finish`.
What a run directory holds and how it is written (atomic files, a checkpoint at every epoch end and on SIGINT/SIGTERM
at the next step boundary, the previous checkpoint kept) is `lwat.rundir`'s, and the perturbation cache's saved form
is `lwat.cache`'s; this file only calls them.
The loop knows nothing about methods beyond `lwat.methods.Method`: what is perturbed happens in the model
(lwat.attach) and in the method's step, which runs its passes through the `Passes` the loop gives it (autocast,
loss scaling, DDP). Scale: --amp bf16/fp16, --channels-last, --compile, and torchrun for several processes
(`torchrun --nproc_per_node N -m lwat train ...`; across nodes add torchrun's --nnodes/--rdzv-* flags).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import lwat
from lwat import cache, rundir
from lwat.config import ConfigError, TrainConfig, resolve_device
from lwat.data import LOADERS, Loader
from lwat.evaluate import accuracy
from lwat.experiment import build, load_data  # public here too: benchmarks and tests import them from here
from lwat.methods import Passes, get_method
from lwat.models import model_options
from lwat.rundir import CONFIG

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # TrainConfig.amp -> autocast dtype


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written: a full disk); the message says
    why and what was kept."""


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
    batch (never broadcast, as in the paper); the checkpoint holds every rank's cache and RNG state (`lwat.cache`),
    so a resume with the same number of processes is exact. Rank 0 alone writes the run directory; on resume every
    rank reads it (across nodes: a file system all nodes share).

    Args:
        cfg: the configuration (with resume=True it must equal the run's saved config).
        out: the run directory; created if missing. Without resume it must not hold a run already.
        resume: continue from out's newest readable checkpoint (`lwat.rundir.resume_checkpoint`), bit-exact on CPU.
        progress: "bar" (tqdm), "lines" (one line per epoch on stdout), "none", or "auto" (bar on a terminal).
        stop_after_steps: behave as if interrupted after this many steps of this call (for tests).

    Returns:
        The final metrics (also in metrics.json), or {"status": "interrupted", ...} when stopped early;
        the same on every rank.

    Raises:
        ConfigError: a config or run directory that cannot be trained (before anything is written).
        TrainingError: training cannot go on (a non-finite loss, a checkpoint that cannot be written); the
            message says what was kept.
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
        if not rundir.has_checkpoint(out):
            raise ConfigError(f"{out}: no {rundir.CHECKPOINT} to resume from")
    with _process_group(cfg.device) as (rank, world, device), \
            rundir.claim(out, resume=resume) if rank == 0 else contextlib.nullcontext():  # rank 0 writes the run
        # In a function of its own, so the DDP wrapper is gone before the process group is destroyed.
        return _run(cfg, out, method=method, resume=resume, progress=progress, stop_after_steps=stop_after_steps,
                    rank=rank, world=world, device=device)


# ----------------------------------------------------------------------------------------------------------------
# The loop: set up, resume (or start), epochs of steps, a checkpoint at each epoch's end and when stopped


@dataclass(frozen=True)
class _Training:
    """What one process trains with (`_setup`)."""

    cfg: TrainConfig
    method: object  # lwat.methods.Method
    rank: int
    world: int
    device: torch.device
    data: object  # lwat.data.Dataset, on `device`
    meta: dict  # what a checkpoint says about the data: num_classes, image_shape, classes
    model: torch.nn.Module  # the attached model itself (compiled in place with --compile)
    handle: object  # its lwat handle, or None
    ema: object  # make_ema's AveragedModel, or None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.StepLR
    scaler: torch.amp.GradScaler
    loader: Loader  # the global batches, this rank's rows of each
    step: Step


def _new_sums():
    return {"loss": 0.0, "correct": 0, "images": 0, "seconds": 0.0}


@dataclass
class _Position:
    """Where training is: the next step is batch `batch` of epoch `epoch` (both from 0); the epoch's running sums."""

    epoch: int = 0
    batch: int = 0
    sums: dict = field(default_factory=_new_sums)
    steps: int = 0  # steps taken by this call (for stop_after_steps)


def _run(cfg, out, *, method, resume, progress, stop_after_steps, rank, world, device) -> dict:
    t = _setup(cfg, method, rank, world, device)
    pos = _resume(t, out) if resume else _Position()
    if rank == 0:
        if not resume:
            rundir.write_json(out / CONFIG, cfg.to_dict())
        rundir.write_host(out, cfg)
    mode = ("bar" if sys.stderr.isatty() else "lines") if progress == "auto" else progress
    mode = mode if rank == 0 else "none"
    with _stop_on_signals() as stop, _compiling(cfg):
        while pos.epoch < cfg.epochs:
            if not _train_epoch(t, out, pos, stop, mode=mode, stop_after_steps=stop_after_steps):
                _save_checkpoint(t, out, pos)
                return {"status": "interrupted", "epoch": pos.epoch, "batch": pos.batch, "run_dir": str(out)}
            record = _end_epoch(t, pos)
            pos.epoch, pos.batch, pos.sums = pos.epoch + 1, 0, _new_sums()
            _save_checkpoint(t, out, pos, record)
            if mode == "lines":
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
            if _any_rank(stop.is_set(), world, device):
                return {"status": "interrupted", "epoch": pos.epoch, "batch": 0, "run_dir": str(out)}
        return _finish(t, out)


def _compiling(cfg: TrainConfig):
    # --compile is lwat's compiled path: inductor compiles the graphs on the first steps (the backward, which writes
    # the cache, at the first backward; again for a new shape or the eval pass), so the whole training runs inside
    # lwat.fusion_rule(), the same for every method so that runs compare like with like (what it changes for a plain
    # model and for lat: benchmarks/README.md), and inductor's own rule is back when training returns.
    return lwat.fusion_rule() if cfg.compile else contextlib.nullcontext()


def _setup(cfg, method, rank, world, device) -> _Training:
    # The data and the loader of this rank's rows (first: options the images cannot take fail before anything is
    # built), the model (the same initial weights on every rank), its average, the compiled model, the DDP wrapper,
    # the optimizer, lr schedule and loss scaler, and the step.
    data = load_data(cfg).to(device)
    # The global batch (the same on every rank); each rank gathers and augments only its own rows of it (the
    # loader draws from its own generators, not the global RNG seeded next).
    loader = Loader(data.train_x, data.train_y, cfg.batch_size * world, train=True, crop=cfg.crop,
                    flip=cfg.flip, seed=cfg.seed, channels_last=cfg.channels_last,
                    rows=slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size), cutout=cfg.cutout,
                    mixup=cfg.mixup, cutmix=cfg.cutmix, mix_prob=cfg.mix_prob, num_classes=data.num_classes)
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
    meta = {"num_classes": data.num_classes, "image_shape": list(data.image_shape), "classes": data.classes}
    return _Training(cfg, method, rank, world, device, data, meta, model, handle, ema, opt, sched, scaler, loader,
                     Step(method, stepped, handle, cfg, run, opt, scaler, ema, model))


def _resume(t: _Training, out: Path) -> _Position:
    # Everything the newest readable checkpoint holds goes back in place, this rank's cache and RNG state last.
    ckpt = rundir.resume_checkpoint(out)
    t.model.load_state_dict(ckpt["model"])
    t.opt.load_state_dict(ckpt["optimizer"])
    t.sched.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):  # saved by an enabled (fp16) scaler
        t.scaler.load_state_dict(ckpt["scaler"])
    if t.ema is not None:
        t.ema.load_state_dict(ckpt["ema"])
    saved_world = cache.saved_world_size(ckpt)
    if saved_world != t.world and ckpt["batch"] != 0:
        raise ConfigError(f"{out}: the checkpoint was written mid-epoch by {saved_world} process(es), and the "
                          f"split of the epoch into global batches depends on that number: resume with as many, "
                          f"not {t.world}")
    # Another number of processes, at an epoch end: the saved states are reused, rank % the saved number's.
    mine = cache.rank_entry(ckpt, t.rank, t.world, device=t.device, any_world=True)
    if mine is None:
        raise ConfigError(f"{out}: its checkpoint holds no state for process {t.rank} of {t.world}")
    if t.handle is not None:
        t.handle.load_state_dict(mine[cache.KEY])
    _set_rng(mine["rng"], t.device)
    if t.rank == 0:
        rundir.truncate_log(out, ckpt["epoch"])  # epochs logged after this checkpoint are trained again
    return _Position(ckpt["epoch"], ckpt["batch"], ckpt["sums"])


def _train_epoch(t: _Training, out: Path, pos: _Position, stop: threading.Event, *, mode: str,
                 stop_after_steps: int | None) -> bool:
    # Steps from pos.batch to the end of epoch pos.epoch, counted into pos; False when stopped before its end (a
    # signal on any rank, or stop_after_steps), True when the epoch is done.
    from tqdm import tqdm  # the experiments extra's: imported here, so that `lwat presets` runs without it

    t.step.model.train()
    bar = tqdm(total=len(t.loader), initial=pos.batch, desc=f"epoch {pos.epoch + 1}/{t.cfg.epochs}",
               disable=mode != "bar", leave=False, dynamic_ncols=True)
    sums = pos.sums
    tick = time.perf_counter()
    with contextlib.closing(bar):
        for batch, (x, y) in enumerate(t.loader.iter_from(pos.epoch, pos.batch), start=pos.batch):
            loss, logits = t.step.gradients(x, y)
            labels = y.argmax(1) if y.ndim == 2 else y  # mixup, CutMix: the larger share
            # One host sync per step, one all-reduce under DDP: summed loss, correct, and any rank stopping.
            stats = torch.stack([loss.float() * len(y), (logits.argmax(1) == labels).sum().float(),
                                 loss.new_tensor(float(stop.is_set()))])
            if t.world > 1:
                dist.all_reduce(stats)
            loss_sum, correct, stopping = stats.tolist()
            if not math.isfinite(loss_sum):
                raise _non_finite(loss_sum, pos.epoch, batch, out, t.rank)
            t.step.update()
            sums["loss"] += loss_sum
            sums["correct"] += round(correct)
            sums["images"] += len(y) * t.world
            now = time.perf_counter()
            sums["seconds"] += now - tick
            tick = now
            bar.update()
            bar.set_postfix(loss=f"{sums['loss'] / sums['images']:.3f}", acc=f"{sums['correct'] / sums['images']:.3f}",
                            img_s=f"{sums['images'] / sums['seconds']:.0f}")
            pos.batch, pos.steps = batch + 1, pos.steps + 1
            if stopping or pos.steps == stop_after_steps:
                return False
    return True


def _end_epoch(t: _Training, pos: _Position) -> dict:
    # The epoch's log record, measured on what the run yields (the average, with --ema); then the lr schedule steps.
    if t.world > 1:  # every rank gets rank 0's BatchNorm statistics, and their average's (each rank's followed its
        # own): the model and its average are then the same everywhere, and the ones the checkpoint keeps
        for buffer in (*t.model.buffers(), *(t.ema.buffers() if t.ema is not None else ())):
            dist.broadcast(buffer, 0)
    tested = t.model if t.ema is None else t.ema.module
    sums, batch_size = pos.sums, t.cfg.eval_batch_size
    record = {"epoch": pos.epoch + 1, "lr": t.opt.param_groups[0]["lr"],
              "train_loss": sums["loss"] / sums["images"], "train_acc": sums["correct"] / sums["images"],
              "test_acc": _accuracy(tested, t.data.test_x, t.data.test_y, batch_size, t.world, t.device),
              "seconds": sums["seconds"], "images_per_s": sums["images"] / sums["seconds"]}
    if t.data.val_x is not None:
        record["val_acc"] = _accuracy(tested, t.data.val_x, t.data.val_y, batch_size, t.world, t.device)
    with warnings.catch_warnings():  # resumed after an epoch's last step: no optimizer step in this process
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
        t.sched.step()
    return record


def _save_checkpoint(t: _Training, out: Path, pos: _Position, record: dict | None = None) -> None:
    # Rank 0 writes the epoch's log record (if given) and the checkpoint of `pos`, with every rank's cache and RNG
    # state gathered (`lwat.cache`); a write that fails (a full disk) stops every rank with a TrainingError.
    mine = cache.entry(t.handle.state_dict() if t.handle is not None else None, rng=_get_rng(t.device))
    entries = {0: mine}
    if t.world > 1:
        gathered = [None] * t.world if t.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        entries = dict(enumerate(gathered)) if t.rank == 0 else None
    error = None
    if t.rank == 0:
        state = {"model": t.model.state_dict(), "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
                 "scaler": t.scaler.state_dict(), **({"ema": t.ema.state_dict()} if t.ema is not None else {}),
                 **cache.pack(entries, t.world),
                 # rank 0's entry again beside the others: the one-process layout that older lwat reads
                 cache.KEY: entries[0][cache.KEY], "rng": entries[0]["rng"],
                 "epoch": pos.epoch, "batch": pos.batch, "sums": pos.sums, "config": t.cfg.to_dict(), "data": t.meta}
        try:
            if record is not None:
                rundir.append_log(out, record)
            rundir.save_checkpoint(state, out)
        except OSError as e:
            error = _write_failed(e, out, state)
    if _any_rank(error is not None, t.world, t.device):
        raise error or TrainingError(f"{out}: rank 0 could not write the checkpoint; stopped")


def _finish(t: _Training, out: Path) -> dict:
    # The final metrics, written by rank 0 (which drops the previous checkpoint), returned on every rank.
    metrics = None
    if t.rank == 0:
        passes = t.method.passes * (2 if t.cfg.sam else 1)
        metrics = {**rundir.summarize(rundir.read_log(out), t.cfg, passes), "world_size": t.world}
        rundir.write_json(out / rundir.METRICS, metrics)
        rundir.drop_previous(out)
    if t.world > 1:
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


def _write_failed(e: OSError, out: Path, state: dict) -> TrainingError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"; {shutil.disk_usage(out).free / 1e6:.1f} MB are free"
        except OSError:
            free = ""
        what = (f"{out}: no space left on its disk to write the checkpoint (it needs about "
                f"{rundir.state_bytes(state) / 1e6:.1f} MB{free})")
        fix = "free some space"
    else:
        what, fix = f"{out}: cannot write the checkpoint ({e.strerror or e})", "fix that"
    if rundir.has_checkpoint(out):
        return TrainingError(f"{what}. The previous checkpoint is kept: {fix}, then lwat train --resume {out}")
    rundir.discard_start(out)
    return TrainingError(f"{what}, before the first checkpoint: nothing was kept; {fix}, then the same command "
                         "starts the run again")


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
