"""Experiment: the int8 sign inside kernels="fused"'s compiled BatchNorm backward, written three ways (CPU).

lwat's `_bn_backward` (lwat/_compile.py) is compiled as it is ("no Eq. 5" with capture=False; with capture=True,
its sign is lwat's `_int8_sign`) and twice more with `_int8_sign` swapped in a copy of its globals (so the
BatchNorm code timed is lwat's own). Each runs on ResNet-20's three activation shapes at batch 128, contiguous
and channels-last, taking turns; each line gives the median of 25 calls and the extra time over "no Eq. 5". All
variants' signs are checked equal first.

    python benchmarks/experiments/int8_sign.py

Runs against lwat/_compile.py as it was at b00be2d (`git worktree add /tmp/lwat-b00be2d b00be2d`, then
PYTHONPATH=/tmp/lwat-b00be2d): the kernels it compares now live in lwat/_fused.py, with the int32 sign it chose.
"""

import statistics
import time

import torch

from lwat import _compile

torch.set_num_threads(2)


def with_sign(int8_sign):
    """lwat's _bn_backward, compiled, with its int8 sign computed by `int8_sign`."""
    return torch.compile(_compile._code_copy(_compile._bn_backward, _int8_sign=int8_sign))


VARIANTS = {
    "sign().to(int8)": with_sign(lambda g: torch.sign(g).to(torch.int8)),
    "sign().to(int32).to(int8) (lwat's)": with_sign(_compile._int8_sign),
    "(g > 0) - (g < 0)": with_sign(lambda g: (g > 0).to(torch.int8) - (g < 0).to(torch.int8)),
}


def main():
    plain = with_sign(_compile._int8_sign)
    for shape in [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]:
        for layout in (torch.contiguous_format, torch.channels_last):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen).contiguous(memory_format=layout)
            g = (torch.randn(shape, generator=gen).relu_() * (torch.rand(shape, generator=gen) - 0.5)
                 ).contiguous(memory_format=layout)  # about half exact zeros, as before a ReLU
            weight, invstd = torch.randn(shape[1], generator=gen), torch.rand(shape[1], generator=gen) + 0.5
            mean = x.mean((0, 2, 3))
            calls = {"no Eq. 5": lambda: plain(g, x, weight, mean, invstd, False)}
            calls.update({name: (lambda f=f: f(g, x, weight, mean, invstd, True)) for name, f in VARIANTS.items()})
            with torch.no_grad():
                signs = [calls[name]()[3] for name in VARIANTS]
                assert all(torch.equal(s, torch.sign(g).to(torch.int8)) for s in signs)
                times = {name: [] for name in calls}
                for r in range(25):
                    order = list(calls)[r % len(calls):] + list(calls)[:r % len(calls)]
                    for name in order:
                        start = time.perf_counter()
                        calls[name]()
                        times[name].append(time.perf_counter() - start)
            base = statistics.median(times["no Eq. 5"])
            cells = [f"{name} {1e3 * statistics.median(t):.3f} (+{1e3 * (statistics.median(t) - base):.3f})"
                     for name, t in times.items()]
            print(tuple(shape), "channels-last" if layout == torch.channels_last else "contiguous", "ms:",
                  " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
