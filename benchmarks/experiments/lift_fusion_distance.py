"""Run a Python script with inductor's distance rule for horizontal fusion lifted (an experiment; torch 2.13).

Inductor does not fuse two loops that share an input when their nodes are more than 64 apart in the graph's
original order (`torch._inductor.scheduler.Scheduler.are_long_distant_nodes`, a heuristic against longer
buffer lifetimes). lat's cache writes are mutations of graph inputs, which AOTAutograd places at the end of the
backward graph, so this rule keeps them out of the BatchNorm backward's loops (see fused_cache_write.patch).
The rule is replaced by "never too far" for the whole run, and inductor's caches are turned off so that every
graph is compiled under it (the caches do not know of the change).

    python benchmarks/experiments/lift_fusion_distance.py benchmarks/step_overhead.py --models resnet20 \
        --modes compiled --amp off --steps 20
"""

import os
import runpy
import sys

os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

from torch._inductor.scheduler import Scheduler  # noqa: E402

if not hasattr(Scheduler, "are_long_distant_nodes"):  # another torch: refuse, rather than lift nothing
    sys.exit("lift_fusion_distance: this torch has no Scheduler.are_long_distant_nodes (written for torch 2.13)")
Scheduler.are_long_distant_nodes = lambda self, node1, node2: False

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python {sys.argv[0]} SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
