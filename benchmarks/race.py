"""Side-by-side timing shared by the benchmarks: contenders take turns in one process, in a rotating order.

Each round runs every contender once, so drift in machine speed hits all alike; the order rotates by one each
round (A B C, B C A, C A B, ...), so no contender always runs right after the same neighbour. With a fixed order,
a second copy of the baseline in second place measured 1.01x the first (ResNet-20, batch 128, 2 CPU threads,
three runs of 25-40 rounds: 1.009, 1.010, 1.012); rotated, 0.992 and 1.009 (two runs of 40).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def race(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 0,
         sync: Callable[[], object] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each call of each contender, `rounds` timed rounds after `warmup` untimed ones.

    `sync` runs before and after each timed call (torch.cuda.synchronize on a GPU)."""
    names = list(contenders)
    times = {name: [] for name in names}
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
