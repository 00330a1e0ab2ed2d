"""Benchmark: what lwat.fusion_rule() changes in a compiled training step, side by side in one process (CPU).

Four contenders take turns (benchmarks/race.py), each a ResNet-20 training step (forward, cross-entropy, backward,
SGD) at batch 128 under torch.compile: the plain model and lat compiled by inductor's own rule, then the plain
model and lat whose first step (where the forward and backward compile) ran inside `with lwat.fusion_rule()`.
Both sides of each pair are compiled the same way: compare lat with the baseline compiled as it was. Prints each
contender's median step and its median and fastest step over the first baseline's.

    python benchmarks/fusion_rule.py --rounds 40 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F

import lwat
from lwat.models import build_model
from race import race


def training_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (compilation happens in the first two)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--eps", type=float, default=10.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model(args.model, 10)
    x, y = torch.rand(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))

    def attached():
        model = copy.deepcopy(base)
        lwat.attach(model, args.eps)
        return model

    steps = {"baseline": training_step(torch.compile(copy.deepcopy(base)), x, y)}
    steps["lat, torch.compile(model)"] = training_step(torch.compile(attached()), x, y)
    for name in list(steps):
        steps[name]()  # compiled (forward and backward) by inductor's own rule
    with lwat.fusion_rule():  # each step below compiles its forward and backward inside the block
        steps["baseline, in fusion_rule()"] = training_step(torch.compile(copy.deepcopy(base)), x, y)
        steps["lat, in fusion_rule()"] = training_step(torch.compile(attached()), x, y)
        for name in list(steps)[2:]:
            steps[name]()
    times = race(steps, args.rounds, args.warmup)
    median, fastest = statistics.median(times["baseline"]), min(times["baseline"])
    print(f"{args.model}, batch {args.batch_size}, CPU {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds after {args.warmup} warm-up, rotating order")
    print("| contender | median ms | / baseline (median) | / baseline (fastest) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.1f} | {statistics.median(t) / median:.3f} | "
              f"{min(t) / fastest:.3f} |")


if __name__ == "__main__":
    main()
