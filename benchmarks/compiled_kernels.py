"""Profile: where compiled lat's extra time goes, in inductor's generated kernels (CPU).

Under torch.compile, lat has no kernels of its own: Eq. 6 and Eq. 5 are fused into the model's kernels. This
script compiles a baseline and an attached copy of a model (same weights), runs a few training steps of each
(forward, backward; no optimizer) under torch.profiler with inductor's kernel profiling on, and prints per step:
the time in inductor's fused kernels of the forward and of the backward, in aten ops (mostly the convolutions,
which inductor leaves to oneDNN on the CPU), and the largest fused kernels of each. The forward and backward are
profiled apart, so each kernel is counted where it runs. Profiler times are inflated against plain step times,
and two runs differ by up to ~2 ms in the fused kernels and ~9 ms in the aten ops: compare the two models of one
run, and run it twice.

    python benchmarks/compiled_kernels.py --model resnet20 --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import copy

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

import lwat
from lwat.models import build_model

FUSED = "cpp_fused"  # in the names of inductor's generated C++ kernels in a profile


def profile(model, x, y, steps):
    """{"forward"/"backward": {event name: self ms per step}} over `steps` training steps."""
    times = {"forward": collections.Counter(), "backward": collections.Counter()}
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile() as forward:
            loss = F.cross_entropy(model(x), y)
        with torch.profiler.profile() as backward:
            loss.backward()
        for part, prof in (("forward", forward), ("backward", backward)):
            for event in prof.key_averages():
                times[part][event.key] += event.self_cpu_time_total / 1e3 / steps
    return times


def summary(counter):
    fused = sum(ms for name, ms in counter.items() if FUSED in name)
    aten = sum(ms for name, ms in counter.items() if name.startswith("aten::"))
    return fused, aten


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="profiled steps per model (after 3 untimed)")
    parser.add_argument("--eps", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--top", type=int, default=4, help="largest fused kernels listed per part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel becomes a profiler event
    torch.manual_seed(0)
    base = build_model(args.model, 10)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    models = {"baseline": copy.deepcopy(base), "lat": copy.deepcopy(base)}
    lwat.attach(models["lat"], args.eps)
    results = {}
    for name, model in models.items():
        model.compile()  # in place, as the trainer does
        for _ in range(3):  # the cache, then compilation
            F.cross_entropy(model(x), y).backward()
        results[name] = profile(model, x, y, args.steps)
    print(f"{args.model}, batch {args.batch_size}, CPU {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"ms per step (profiler self time, mean of {args.steps} steps)")
    print("| model | forward: fused kernels | forward: aten ops | backward: fused kernels | backward: aten ops |")
    print("|---|---|---|---|---|")
    for name, parts in results.items():
        (ff, fa), (bf, ba) = summary(parts["forward"]), summary(parts["backward"])
        print(f"| {name} | {ff:.1f} | {fa:.1f} | {bf:.1f} | {ba:.1f} |")
    for name, parts in results.items():
        for part, counter in parts.items():
            top = sorted(((ms, k) for k, ms in counter.items() if FUSED in k), reverse=True)
            for ms, kernel in top[:args.top]:
                print(f"{name} {part}: {ms:6.2f} ms  {kernel[:110]}")


if __name__ == "__main__":
    main()
