"""Benchmark: training-step time of baseline, lat and fgsm side by side, eager or compiled, fp32 or bf16.

For each model, batch size, mode (eager; eager with each BatchNorm point's BatchNorm, Eq. 6 and Eq. 5 compiled
together, `attach(kernels="fused")`; torch.compile, every model by `model.compile()`; the same with every model's
graphs compiled inside `lwat.fusion_rule()`: each mode compiles both sides the same way, so compare lat with the
baseline of its own row, compiled as the user would compile the plain model) and
precision (--amp off / bf16 / fp16), three
models with the same weights (baseline, lat = lwat.attach, fgsm), the data loader and a second copy of the
baseline take turns, step for step, in one process, in an order that rotates each round (benchmarks/race.py), so
drift in machine speed hits all alike. Each step is the trainer's own: the method's
step from lwat.methods with lwat.train.make_passes (autocast, GradScaler for fp16), then SGD. The table gives
medians, images/s, the ratios lat/baseline and fgsm/baseline of the medians (the paper's Table 4 "training
time": lat about 1x, fgsm about 2x), lat/baseline of the fastest steps (on a shared machine, the least
disturbed ones), A/A (the second baseline over the first: how far a ratio moves with no difference in the
work, this run's noise), the floor of lat/baseline (below), lat's peak-memory ratio, an epoch of CIFAR-10
extrapolated from the median step, and the input pipeline's share of a step (a Loader batch: uint8 gather,
crop, flip, to float).

The floor is what lat must cost at least if its work were pure memory traffic: per perturbed element and step,
the forward reads 1 byte of cached signs, and the backward reads the gradient once (4 bytes in fp32, 2 in
bf16) and writes 1 byte of signs; those bytes over this machine's copy bandwidth (the best of a few copies of
a buffer as large as all the points' activations, bytes read + written per second), added to the baseline
step: floor = 1 + bytes / bandwidth / fastest baseline step. An eager pass cannot fuse Eq. 6 into the kernel that
makes the activation, so it also reads and writes the activation once: the "eager floor" (eager rows that run
the model's own kernels, so not eager-fused, whose BatchNorm kernels make the perturbed activation) adds
those bytes (14 per element in fp32, 8 in bf16, against the floor's 6 and 4). Both count one read of the gradient
for Eq. 5's range and signs together, as one fused pass does (aten's aminmax and sign read it twice).

    python benchmarks/step_overhead.py              # ResNet-20, VGG-16-BN; batch 128; eager, compiled; fp32, bf16
    python benchmarks/step_overhead.py --device cuda --batch-size 128 512 --steps 50
    python benchmarks/step_overhead.py --models resnet20 --modes eager --amp off --steps 5   # a quick check
    python benchmarks/step_overhead.py --compile-backend aot_eager    # compiled without inductor's C++ build
    python benchmarks/step_overhead.py --modes eager eager-fused compiled compiled-rule --amp off
    python benchmarks/step_overhead.py --models resnet20 --modes compiled --amp off --scale fixed --eps 0.01
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

import lwat
from lwat.config import AMPS, TrainConfig
from lwat.data import Loader
from lwat.methods import get_method
from lwat.models import build_model
from lwat.perturb import SCALES
from lwat.train import make_passes
from race import race

METHODS = ("baseline", "lat", "fgsm")
MODES = {"eager": "eager", "eager-fused": "eager, kernels=fused", "compiled": "compiled ({backend})",
         "compiled-rule": "compiled ({backend}), lwat.fusion_rule()"}
KERNELS = {"eager-fused": "fused"}  # attach(kernels=...) of a mode; else "aten"
CIFAR_TRAIN = 50_000  # images in a CIFAR-10 training epoch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(step, device):
    """Peak bytes allocated by one step above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    # CPU: replay the profiler's allocation records in time order: each op's own allocations minus
    # frees (children excluded), plus the allocations made outside any op ("[memory]" events).
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = low = peak = 0  # frees of memory from before the step count from the lowest level seen
    for _, nbytes in events:
        live += nbytes
        low = min(low, live)
        peak = max(peak, live - low)
    return peak


def make_step(name, model, x, y, cfg, device, amp, backend):
    """One training step of method `name` as lwat.train runs it: the method's passes, then the optimizer."""
    method = get_method(name)
    handle = lwat.attach(model, cfg.eps, scale=cfg.scale, kernels=cfg.kernels) if method.layerwise else None
    if cfg.compile:
        model.compile(backend=backend)  # in place, after attach, as the trainer does; every model alike
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    run = make_passes(model, handle, amp=amp, device_type=device.type, scaler=scaler)

    def step():
        opt.zero_grad(set_to_none=True)
        method.step(model, handle, x, y, cfg, run)
        scaler.step(opt)
        scaler.update()
    return step, handle


def copy_bandwidth(elements, device, repeats=5):
    """Bytes read + written per second by the best of `repeats` copies of an fp32 buffer of `elements` elements."""
    src = torch.rand(elements, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def bench(name, width, batch, device, steps, warmup, mode, amp, eps, scale, channels_last, backend):
    torch._dynamo.reset()  # each row compiles afresh (and stays under dynamo's recompile limit)
    torch.manual_seed(0)
    options = {"width": width} if width != 1.0 else {}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = build_model(name, 10, **options).to(device, memory_format=fmt)
    cfg = TrainConfig(eps=eps, scale=scale, compile=mode.startswith("compiled"), kernels=KERNELS.get(mode, "aten"))
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    runs, handles = {}, {}
    for method in METHODS:
        runs[method], handles[method] = make_step(method, copy.deepcopy(base), x, y, cfg, device, amp, backend)
    images = torch.randint(0, 256, (CIFAR_TRAIN, 3, 32, 32), dtype=torch.uint8, device=device)
    loader = Loader(images, torch.randint(0, 10, (CIFAR_TRAIN,), device=device), batch, train=True, crop=True,
                    flip=True, channels_last=channels_last)
    batches = (b for epoch in range(10**9) for b in loader.iter_from(epoch))
    runs["loader"] = lambda: next(batches)
    runs["baseline again"], _ = make_step("baseline", copy.deepcopy(base), x, y, cfg, device, amp, backend)  # A/A
    # compiled-rule: every model's graphs compile inside the block (the forward at its first step, the backward at
    # its first backward, both in the warm-up steps); outside it inductor is untouched
    with lwat.fusion_rule() if mode == "compiled-rule" else contextlib.nullcontext():
        times = race(runs, steps, warmup, lambda: sync(device))
    memory = {label: peak_memory(runs[label], device) for label in ("baseline", "lat")}
    cache = handles["lat"].state_dict().values()
    cache_bytes = sum(v["signs"].nbytes + v["scale"].nbytes for v in cache)
    elements = sum(v["signs"].numel() for v in cache)
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
    best = {label: 1e3 * min(t) for label, t in times.items()}  # the least disturbed step, on a shared machine
    value_bytes = 2 if amp != "off" else 4  # the points' activations (and so their gradients) in the autocast dtype
    per_second = copy_bandwidth(elements, device)
    floor_bytes = 1 + value_bytes + 1
    floor_s = elements * floor_bytes / per_second
    eager_floor_s = elements * (floor_bytes + 2 * value_bytes) / per_second  # + the activation read and written
    epoch_steps = CIFAR_TRAIN // batch
    return {
        "model": name + (f" (width {width})" if width != 1.0 else ""), "batch": batch,
        "mode": MODES[mode].format(backend=backend), "amp": amp,
        **{f"{m} ms": ms[m] for m in METHODS},
        **{f"{m} img/s": 1e3 * batch / ms[m] for m in METHODS},
        "lat/baseline": ms["lat"] / ms["baseline"], "lat/baseline (min)": best["lat"] / best["baseline"],
        "A/A": ms["baseline again"] / ms["baseline"],
        "floor": 1 + 1e3 * floor_s / best["baseline"],
        # eager modes that run the model's own kernels only
        "eager floor": "—" if mode != "eager" else 1 + 1e3 * eager_floor_s / best["baseline"],
        "fgsm/baseline": ms["fgsm"] / ms["baseline"],
        "lat/baseline memory": memory["lat"] / max(memory["baseline"], 1),
        "cache B/elem": cache_bytes / elements,
        "epoch s (baseline / lat / fgsm)": " / ".join(f"{ms[m] * epoch_steps / 1e3:.1f}" for m in METHODS),
        "loader share": f"{100 * ms['loader'] / (ms['loader'] + ms['baseline']):.1f}%",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg16_bn"])
    parser.add_argument("--vgg-width", type=float, default=1.0, help="width multiplier of vgg16_bn")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128], help="e.g. 128 512")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (compilation: torch.compile's on steps 1-2, lat's kernels' on 1)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=list(MODES),
                        help="eager; eager-fused: eager with attach(kernels='fused'); compiled: model.compile(); "
                             "compiled-rule: model.compile(), graphs compiled inside lwat.fusion_rule()")
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=AMPS, help="precisions to compare")
    parser.add_argument("--eps", type=float, default=10.0, help="lat's eps (the cost does not depend on it)")
    parser.add_argument("--scale", default="range", choices=SCALES,
                        help="lat's eps_l: range (eps x the gradient's range, the default) or fixed (eps)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled mode")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        for batch in args.batch_size:
            for mode in args.modes:
                for amp in args.amp:
                    width = args.vgg_width if name.startswith("vgg") else 1.0
                    rows.append(bench(name, width, batch, device, args.steps, args.warmup, mode,
                                      amp, args.eps, args.scale, args.channels_last, args.compile_backend))
                    print_table(rows[-1:], header=len(rows) == 1)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{hardware}, torch {torch.__version__}, median of {args.steps} alternating steps (rotating order) "
          f"after {args.warmup} warm-up{', channels-last' if args.channels_last else ''}; lat: eps {args.eps:g}, "
          f"scale={args.scale}. "
          "A step: the method's forward and backward "
          "passes and SGD. memory: peak bytes allocated during one step. epoch s: extrapolated (median step x "
          f"{CIFAR_TRAIN} // batch steps of CIFAR-10; no input pipeline, no test pass), not timed. loader share: "
          "a Loader batch (uint8 gather, crop, flip, to float) / (that + the baseline step).")


def print_table(rows, header):
    cols = list(rows[0])
    if header:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{v:.0f}" if k.endswith("img/s") else f"{v:.2f}" if isinstance(v, float) else str(v)
                 for k, v in row.items()]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
