"""torch.compile support for perturbation points: the cache sized before dynamo traces a pass, and Eq. 5 in a
compiled backward. Imported by lwat/perturb.py only while dynamo traces an attached model.

A compiled graph can mutate a tensor it was given but cannot make one that outlives it, so each point's cache must
exist, at this pass's activation shape, before dynamo traces the pass. The attached model's class (perturb.py's
`_Attached`) checks the inputs' shapes in traced code (dynamo guards on them, so a fixed-shape loop
traces nothing more); on new shapes it calls `size_cache`, which dynamo does not trace (one graph break, before any
of the model's code): it runs the model on the meta device, where every point makes (or keeps) its cache, with
every torch.compile'd call inside forced eager (`model.compile()` makes the module's own `__call__` a compiled one:
traced, the meta pass would split the model at each point and compile shared block code once per block variant, up
to dynamo's recompile limit, which a plain model of the same classes then shares). A point that still finds no
cache (shapes that change although the inputs' do not; a model that cannot run on the meta device, which is warned
about) makes it with `fit_cache`, a graph break at that point: correct, slower to compile.

Torch APIs used: public (torch.compiler.disable, torch.compiler.set_stance, torch.func.functional_call, the meta
device) and private: torch.utils._pytree.tree_leaves / tree_map (tensors inside nested inputs). Tested on torch
2.13.0+cpu. torch 2.13's inductor may hand a backward a channels-last copy of a 4-D graph input that it mutates
there, so the mutation is lost: a 4-D cache is sized channels-last (inductor's layout for a conv net's
activations) and any other is given to the graph as one flat 1-D tensor (`graph_cache`).
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch.utils._pytree import tree_leaves, tree_map

from lwat import cache, perturb
from lwat._fused import KernelsError  # noqa: F401  (lwat/cli.py imports it from here; its home is _fused)

fit_cache = torch.compiler.disable(cache.fit)  # a graph break where a point finds no cache


@torch.compiler.disable  # one graph break, on the passes that must size the cache
def size_cache(handle, module, args, kwargs, shapes) -> None:
    first = next(itertools.chain(module.parameters(), module.buffers(),
                                 (t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))))

    def meta(t):
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    state = dict(itertools.chain(module.named_parameters(remove_duplicate=False),
                                 module.named_buffers(remove_duplicate=False)))
    handle._sizing = first.device  # the activations' device: the module's (its inputs' without parameters)
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            torch.func.functional_call(module, tree_map(meta, state), tree_map(meta, args), tree_map(meta, kwargs))
    except Exception as e:  # a model that cannot run on the meta device (.item(), custom kernels, ...)
        warnings.warn(f"lwat: {type(module).__name__} cannot run on the meta device ({type(e).__name__}: {e}), so "
                      "the perturbation cache is not sized before torch.compile traces it: each point makes its "
                      "own on the first pass, with a graph break (correct, slower to compile)", stacklevel=2)
    finally:
        handle._sizing = None
    handle._sized_for = shapes


def graph_cache(state, handle, out: torch.Tensor) -> tuple:
    """The rest of `Eq5.apply`'s arguments: the cache and the handle's settings as a compiled graph reads them."""
    signs = state.signs if state.layout == torch.channels_last else state.flat  # see the module docstring
    return (signs, state.scale, handle._loss_scale, handle._eps, handle.scale, handle.direction, state.layout,
            _may_overflow(handle, out))


def _may_overflow(handle, out: torch.Tensor) -> bool:
    # Whether the compiled backward must guard the cache against an overflowed gradient (a step a GradScaler
    # skips), decided at trace time: a loss scale set already, or fp16 autocast. The guard costs a pass.
    return handle.grad_scale is not None or (
        torch.is_autocast_enabled(out.device.type) and torch.get_autocast_dtype(out.device.type) == torch.float16)


class Eq5(torch.autograd.Function):
    """perturb._Eq5 for a compiled graph: the cache comes as tensors, eps and the loss scale as the handle's 0-dim
    tensors (updated in place by `handle.eps = ...` and `handle.grad_scale = ...`)."""

    @staticmethod
    def forward(ctx, out, signs, scale, loss_scale, eps, scale_kind, direction, layout, guard):
        ctx.cache = signs, scale, loss_scale, eps, scale_kind, direction, layout, guard
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g):
        signs, scale, loss_scale, eps, scale_kind, direction, layout, guard = ctx.cache
        if signs.dim() == 1:
            signs = cache.unflatten(signs, g.shape, layout)
        lo_hi_ordered = None
        if g.dim() > 2:
            # Per channel first: the loops of the BatchNorm's own backward reductions, so inductor fuses them
            # (one pass over g), and the signs, after a per-channel reduction, into its input-gradient loop.
            per_channel = [0, *range(2, g.dim())]
            if scale_kind == "range" or guard:  # min and max are exact, so the range is the same
                lo_c, hi_c = g.amin(per_channel, keepdim=True), g.amax(per_channel, keepdim=True)
                lo_hi_ordered = lo_c.amin(), hi_c.amax(), hi_c >= lo_c  # a channel with a NaN gets 0 signs
            else:  # eps_l = eps, no guard: the BatchNorm's own per-channel sum spares the min and max
                total = g.sum(per_channel, keepdim=True)
                lo_hi_ordered = total.new_zeros(()), total.new_zeros(()), total == total
        with torch.no_grad():
            signs.copy_(perturb._cache_gradient(g, signs, scale, eps, loss_scale, guard, scale_kind, direction,
                                                lo_hi_ordered))
        return g, *[None] * 8
