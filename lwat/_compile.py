"""torch.compile support for perturbation points: gradient sinks, and dropping the first step's split code.

A tensor hook registered inside a compiled graph would break it, so under torch.compile a point's output
also gets a *sink* added: a zero leaf expanded (stride 0, 4 bytes) to the activation's shape. Autograd
writes dJ/da into `sink.grad`, and a post-accumulate-grad hook on that leaf, which runs in the eager autograd
engine outside any compiled graph, hands it to perturb.py's Eq. 5 (no state is mutated from inside a
compiled backward, which compiled silently wrong). Making a sink is one graph break per point on the first
step; the hook then drops the compiled code that break split, so the next step compiles into one graph.

Private torch APIs used (everything else here is public), tested on torch 2.13.0:
- `torch._dynamo.utils.orig_code_map`: dynamo's map from the code objects it compiled to the original ones,
  read to find which user frames (the model's forward, or a compiled wrapper) a sink's graph break split.
- `torch._dynamo.reset_code`: drops dynamo's compiled entries of one code object, so it compiles afresh.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

is_compiling = torch.compiler.is_compiling


def add_sink(state, out: torch.Tensor, codes: set, on_grad: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """`out + sink`, where sink is a zero leaf (kept in `state.sink`) whose gradient goes to `on_grad`.

    `codes` collects the original code of the compiled frames the sink's first graph break splits."""
    sink = state.sink
    if sink is None or sink.shape != out.shape or sink.dtype != out.dtype:
        sink = _new_sink(state, out, codes, on_grad)
    return out + sink


@torch.compiler.disable  # a graph break, once per point and shape
def _new_sink(state, out, codes, on_grad):
    sink = out.new_zeros(()).expand(out.shape).detach().requires_grad_()

    def hook(leaf):  # runs in the eager autograd engine, in backward, outside any compiled frame
        grad, leaf.grad = leaf.grad, None
        drop_compiled(codes)
        on_grad(grad)

    sink.register_post_accumulate_grad_hook(hook)
    state.sink = sink
    # The compiled frames now running (the model's, or whatever wrapper was compiled) were split here;
    # remember their original code so the hook can drop them once.
    frame = inspect.currentframe()
    while frame is not None:
        original = torch._dynamo.utils.orig_code_map.get(frame.f_code)
        if original is not None:
            codes.add(original)
        frame = frame.f_back
    return sink


def drop_compiled(codes: set) -> None:
    """Drop dynamo's compiled code for `codes` (then empty it): those frames compile whole next time."""
    for code in codes:
        torch._dynamo.reset_code(code)
    codes.clear()
