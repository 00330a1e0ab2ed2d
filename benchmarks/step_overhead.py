"""Benchmark: training-step time and peak memory of lat (lwat.attach) against the plain step, side by side.

Plain and attached instances (same weights) take turns, step for step, in one process, so drift in
machine speed hits both alike; the table gives medians and their ratios. The paper's central claim is
that the method is nearly free (Table 4, "training time" 1x).

    python benchmarks/step_overhead.py                       # ResNet-20 and VGG-16-BN, batch 128, CPU
    python benchmarks/step_overhead.py --device cuda --batch-size 128 512 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import lwat
from lwat.models import build_model


def make_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


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


def bench(name, width, batch, device, steps, warmup, compile_, eps, channels_last):
    torch.manual_seed(0)
    options = {"width": width} if width != 1.0 else {}
    plain = build_model(name, 10, **options).to(device)
    attached = copy.deepcopy(plain)
    handle = lwat.attach(attached, eps)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, attached = plain.to(memory_format=fmt), attached.to(memory_format=fmt)
    x = torch.rand(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    steps_ = {}
    for label, model in (("plain", plain), ("lat", attached)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        steps_[label] = make_step(torch.compile(model) if compile_ else model, opt, x, y)
    times = {label: [] for label in steps_}
    for i in range(warmup + steps):
        for label, step in steps_.items():  # alternate: plain, lat, plain, lat, ...
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                times[label].append(time.perf_counter() - t0)
    memory = {label: peak_memory(step, device) for label, step in steps_.items()}
    cache = handle.state_dict().values()
    cache_bytes = sum(v["signs"].nbytes + v["scale"].nbytes for v in cache)
    elements = sum(v["signs"].numel() for v in cache)
    median = {label: statistics.median(t) for label, t in times.items()}
    return {
        "model": name + (f" (width {width})" if width != 1.0 else ""), "batch": batch,
        "mode": "compiled" if compile_ else "eager",
        "plain ms": 1e3 * median["plain"], "lat ms": 1e3 * median["lat"],
        "time ratio": median["lat"] / median["plain"],
        "plain MiB": memory["plain"] / 2**20, "lat MiB": memory["lat"] / 2**20,
        "memory ratio": memory["lat"] / max(memory["plain"], 1),
        "cache B/elem": cache_bytes / elements,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg16_bn"])
    parser.add_argument("--vgg-width", type=float, default=1.0, help="width multiplier of vgg16_bn")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--eps", type=float, default=10.0, help="range-scaled eps (the cost does not depend on it)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        for batch in args.batch_size:
            for mode in args.modes:
                width = args.vgg_width if name.startswith("vgg") else 1.0
                rows.append(bench(name, width, batch, device, args.steps, args.warmup,
                                  mode == "compiled", args.eps, args.channels_last))
                print_table(rows[-1:], header=len(rows) == 1)
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{hardware}, torch {torch.__version__}, median of {args.steps} alternating steps "
          f"after {args.warmup} warm-up; memory: peak bytes allocated during one step")


def print_table(rows, header):
    cols = list(rows[0])
    if header:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |",
              flush=True)


if __name__ == "__main__":
    main()
