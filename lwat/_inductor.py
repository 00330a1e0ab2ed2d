"""`lwat.fusion_rule()`: inductor may fuse each point's cache write into the point's own backward loop.

Under torch.compile the backward graph writes each point's new signs into its cache, a graph input, and
AOTAutograd places every write into a graph input at the end of the graph. Inductor does not fuse two loops whose
nodes lie more than 64 apart in the graph's order (Scheduler.are_long_distant_nodes, a guard against longer buffer
lifetimes), so every point's write but the last few's runs as a loop of its own that reads the gradient again,
instead of inside the BatchNorm backward's loop that has dJ/da in registers. The rule lifts the distance guard for
a write into a graph input only: such a write keeps what it reads alive to the end of the graph anyway, so running
it earlier can only end those lifetimes sooner. Figures: benchmarks/README.md. Imported only by
`lwat.fusion_rule()`; nothing here changes inductor's state outside that `with` block.

Private torch APIs used (tested on torch 2.13.0+cpu): torch._inductor.choices.InductorChoices (can_fuse_horizontal,
uuid), torch._inductor.virtualized.V (set_choices_handler, graph.graph_inputs), torch._inductor.config
(inductor_choices_class, score_fusion_memory_threshold), Scheduler.mutation_real_name, and the scheduler nodes'
get_nodes() / get_outputs() / get_mutations(). A torch whose scheduler lacks these compiles by inductor's own rule;
one without the modules gets a warning, and the block compiles by inductor's own rule.
"""

from __future__ import annotations

import contextlib
import warnings

try:
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V
except ImportError as e:  # another torch: the plain path
    inductor_config = InductorChoices = V = None
    _MISSING = f"{type(e).__name__}: {e}"
if V is not None and not hasattr(inductor_config, "inductor_choices_class"):  # the option is new in torch 2.10
    V, _MISSING = None, "no inductor_choices_class option"


@contextlib.contextmanager
def fusion_rule():
    """Graphs that inductor compiles inside the block (in this thread; the first training step compiles the
    forward and, at its backward, the backward) use lwat's fusion rule; on exit inductor's own heuristics and
    options are back. `with lwat.fusion_rule(): train for a step or more` after `model.compile()`."""
    if V is None:
        warnings.warn(f"lwat.fusion_rule: this torch lacks inductor's choices API ({_MISSING}); compiling by "
                      "inductor's own rule", stacklevel=3)
        yield
        return
    # The option keys inductor's caches (through uuid() below); the handler is what the scheduler asks. The handler
    # first: set_choices_handler keeps the thread's handler to give back, and where the thread has none yet inductor
    # makes it then from the option, which must still be inductor's own (else lwat's would be given back).
    with V.set_choices_handler(_FusionChoices()), inductor_config.patch(inductor_choices_class=_FusionChoices):
        yield


if InductorChoices is not None:
    class _FusionChoices(InductorChoices):
        """Inductor's heuristics, but a loop that writes into a graph input may fuse with a distant loop."""

        def uuid(self) -> str:  # in inductor's cache keys
            return "lwat._inductor._FusionChoices 2"

        @staticmethod
        def can_fuse_horizontal(scheduler, node1, node2, shared_data_score: int) -> bool:
            if (shared_data_score >= inductor_config.score_fusion_memory_threshold
                    and (_writes_input(scheduler, node1) or _writes_input(scheduler, node2))):
                return True  # what inductor's rule would answer, but for the distance guard
            return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)


def _writes_input(scheduler, node) -> bool:
    try:
        inputs = V.graph.graph_inputs
        return any(scheduler.mutation_real_name.get(name, name) in inputs
                   for n in node.get_nodes() for buf in n.get_outputs() for name in buf.get_mutations())
    except AttributeError:  # another torch's scheduler: inductor's own rule
        return False
