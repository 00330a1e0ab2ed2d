"""torch.compile support for perturbation points: the cache is made before dynamo traces a training pass.

Under torch.compile, Eq. 5 runs inside the compiled backward and overwrites each point's cache in place
(lwat/perturb.py). A compiled graph can mutate a tensor it was given but cannot make one that outlives it,
so a point's cache must exist, at the shape of this pass's activation, before dynamo traces the pass.
`attach` therefore also puts `_Sizing` in front of the attached module's class (as it puts `_Point` in front
of each point's). Dynamo traces its forward with the module: when the inputs' shapes are those the cache was
last made for (every pass but the first, in a fixed-shape loop), it adds nothing to the graph. Otherwise it
calls `_size_cache`, which dynamo does not trace (one graph break, at the start of the module's forward,
before any of the model's code): it runs the module on the meta device, where every point makes (or keeps)
its cache by the rules of an eager pass, and records the shapes. The next pass compiles the module's forward
as one graph with the cache in place. No user code is split at a point, so modules that share one class
(blocks that differ in stride or shortcut) are never compiled frame by frame, and no compiled code has to
be dropped. What remains of the first pass: the frame that called the module (torch's wrapper, or
`Module._call_impl` after `model.compile()`) keeps its code split at the module's forward, guarded on the
attached module's class; each later pass runs that empty region, then the module's forward in one graph.

A point that still finds no cache under torch.compile (activation shapes that change although the inputs'
do not; a compiled submodule of the attached module; a module that cannot run on the meta device, which
is warned about) makes it with perturb.py's `_fit_cache`, a graph break at that point: correct, slower to
compile.

The end of the file holds the kernels of an eager model's `attach(kernels="compiled")` (Eq. 6 and Eq. 5, one
compiled pass each) and of `attach(kernels="fused")` (a BatchNorm point's forward with Eq. 6, its backward with
Eq. 5).

Torch APIs used: public ones (torch.compile, torch.compiler.is_compiling, torch.compiler.disable,
torch.func.functional_call, the meta device) and two private ones, `torch.utils._pytree` (tree_leaves,
tree_map: the tensors inside nested inputs) and `torch._dynamo.exc.BackendCompilerFailed` (the kernels' compile
error). Tested on torch 2.13.0.

A torch 2.13 inductor behaviour this design works around (see `_Eq5` in perturb.py): when a graph input is
read in the forward and mutated in the backward, inductor's layout optimization may hand the backward a
channels-last copy of a 4-D input instead of the input itself, and the mutation never reaches the caller's
tensor. The cache is therefore given to the compiled graph as one flat 1-D tensor.
"""

from __future__ import annotations

import functools
import itertools
import types
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

is_compiling = torch.compiler.is_compiling


class _Sizing(nn.Module):
    """Mixin placed in front of the attached module's own class: under torch.compile, its forward first sizes
    the cache for these inputs (a class, not a forward pre-hook: dynamo guards on a module's class, not on its
    hooks, so compiled code that made the cache for an attached module is never reused for a plain one)."""

    def forward(self, *args, **kwargs):
        handle = self._lwat_handle
        if is_compiling() and (self.training or handle.in_eval) and handle.capture and torch.is_grad_enabled():
            shapes = tuple(tuple(t.shape) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            if shapes != handle._sized_for:
                _size_cache(handle, self, args, kwargs, shapes)
        return super().forward(*args, **kwargs)


def may_overflow(handle, out: torch.Tensor) -> bool:
    """Whether a compiled backward must guard the cache against an overflowed gradient (a step the GradScaler
    skips): decided when dynamo traces the forward, so from what is known then (a loss scale set already, or an
    fp16 autocast, the one precision that needs a GradScaler). The guard costs the compiled backward a pass of
    its own (the signs may be written only once M - m is known to be finite), so it is left out otherwise."""
    return handle.grad_scale is not None or (
        torch.is_autocast_enabled(out.device.type) and torch.get_autocast_dtype(out.device.type) == torch.float16)


@functools.cache
def sizing_class(cls: type) -> type:
    """`cls` behind `_Sizing`, under the same name (so frameworks that record a model's class name see it)."""
    return type(cls.__name__, (_Sizing, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


@torch.compiler.disable  # one graph break, on the passes that must size the cache
def _size_cache(handle, module, args, kwargs, shapes) -> None:
    # The activations' device: the module's (its inputs' if it has no parameter or buffer).
    first = next(itertools.chain(module.parameters(), module.buffers(),
                                 (t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))))
    device = first.device

    def meta(t):
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    state = dict(itertools.chain(module.named_parameters(remove_duplicate=False),
                                 module.named_buffers(remove_duplicate=False)))
    handle._sizing = device
    try:
        with torch.no_grad():
            torch.func.functional_call(module, tree_map(meta, state), tree_map(meta, args), tree_map(meta, kwargs))
    except Exception as e:  # a model that cannot run on the meta device (.item(), custom kernels, ...)
        warnings.warn(f"lwat: {type(module).__name__} cannot run on the meta device ({type(e).__name__}: {e}), so "
                      "the perturbation cache is not sized before torch.compile traces it: each point makes its "
                      "own on the first pass, with a graph break (correct, slower to compile)", stacklevel=2)
    finally:
        handle._sizing = None
    handle._sized_for = shapes


# ---- Eager mode with attach(kernels="compiled"): Eq. 6 and Eq. 5 as one compiled pass each ------------------
# In eager mode Eq. 6 and Eq. 5 are aten kernels (perturb.py): two passes over memory each, with an fp32
# temporary. These compile into one pass each. They take dense 1-D tensors (perturb.py flattens in the cache's
# layout, detached so that dynamo guards on no view's base) and run with autocast off, so one compiled graph
# serves every point, batch size and layout: dynamo compiles again only for another dtype, device or surrounding
# autocast dtype (at its recompile limit it runs the Python below uncompiled: the same numbers, slower). Called
# unrecorded: a compiled function that updates a tensor requiring grad under autograd runs as a compiled
# autograd.Function that copies the result back, slower than the aten kernels (benchmarks/eager_kernels.py).
# Eq. 5's signs come back as a new tensor, which the point keeps: writing them into the old cache from inside a
# compiled function costs a pass of its own (benchmarks/point_kernels.py). Under torch.compile of the model,
# perturb.py uses its aten code, which inductor fuses into the model's own kernels.

@torch.compile(dynamic=True)
def _eq6_kernel(out: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor) -> None:
    # As aten's addcmul_ computes it: the sum in fp32 (fp64 for fp64), rounded once; the caller gives eps_l in
    # the activation's dtype, as aten's type promotion rounds it (a cast in here would be elided by inductor).
    acc = torch.promote_types(out.dtype, torch.float32)
    out.copy_(out.to(acc) + signs.to(acc) * scale.to(acc))


@torch.compile(dynamic=True)
def _eq5_kernel(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _int8_sign(g), g.amin(), g.amax()


def _int8_sign(g: torch.Tensor) -> torch.Tensor:
    # r_l as the compiled kernels store it: through int32, which inductor's CPU code converts to int8 faster than
    # fp32 (inside the BatchNorm backward, three runs: 0.5-1.1 ms less at a 16-channel ResNet-20 point, 0.01-0.05
    # at 32 and 64 channels, never more; Eq. 5 alone: a faster fastest repeat, a median faster in one run of
    # three; no difference measurable in whole steps; benchmarks/experiments/int8_sign.py, point_kernels.py,
    # README "Cost").
    return torch.sign(g).to(torch.int32).to(torch.int8)


class KernelsError(RuntimeError):
    """attach(kernels="compiled" or "fused") cannot compile its kernels on this machine (no C++ compiler, ...)."""


def eq6(out: torch.Tensor, signs: torch.Tensor, scale: torch.Tensor) -> None:
    """out += signs * scale in place (1-D, dense; scale 0-dim in out's dtype), unrecorded, one compiled pass."""
    _run(_eq6_kernel, out, signs, scale)


def eq5(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 sign(g), min(g), max(g)) of a dense 1-D g, in one compiled pass."""
    return _run(_eq5_kernel, g)


# ---- attach(kernels="fused"): at a BatchNorm point, the BatchNorm itself joins the two kernels ---------------------
# Eager, Eq. 6 cannot be fused into the kernel that makes the activation, so it reads and writes the activation
# once more (README "Cost": the eager floor). At a BatchNorm in train mode, lwat instead runs the BatchNorm's
# forward with Eq. 6 as one compiled function (two loops: the per-channel statistics, then the normalization,
# affine and perturbation in one pass), and its backward with Eq. 5 as another (the per-channel sums with g's min
# and max, then the input gradient with the signs). They compute what torch's BatchNorm computes (the batch's
# mean and biased variance normalize; the unbiased variance updates running_var), in fp32 for fp16 and bf16
# inputs, rounded differently: equal to the aten path within float rounding, not bit for bit.

def _bn_forward(x, weight, bias, running_mean, running_var, signs, scale, momentum: float, eps: float):
    acc = torch.promote_types(x.dtype, torch.float32)
    dims, channel = _bn_dims(x)
    var, mean = torch.var_mean(x.to(acc), dims, correction=0)
    n = x.numel() // x.shape[1]
    running_mean.copy_(running_mean * (1 - momentum) + mean * momentum)
    running_var.copy_(running_var * (1 - momentum) + var * (momentum * n / (n - 1)))
    invstd = torch.rsqrt(var + eps)
    y = (x.to(acc) - mean.view(channel)) * (invstd * weight).view(channel) + bias.view(channel)
    if signs is not None:
        y = y + signs.to(acc) * scale  # Eq. 6
    return y.to(x.dtype), mean, invstd


def _bn_backward(g, x, weight, mean, invstd, capture: bool):
    acc = torch.promote_types(x.dtype, torch.float32)
    dims, channel = _bn_dims(x)
    n = x.numel() // x.shape[1]
    xhat = (x.to(acc) - mean.view(channel)) * invstd.view(channel)
    g32 = g.to(acc)
    grad_bias, grad_weight = g32.sum(dims), (g32 * xhat).sum(dims)
    grad_x = (invstd * weight).view(channel) * (g32 - (grad_bias / n).view(channel)
                                                - xhat * (grad_weight / n).view(channel))
    grads = grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    if not capture:
        return *grads, None, None, None
    # Eq. 5: per channel first, so the range joins the sums' loop (one pass over g); min and max are exact.
    return *grads, _int8_sign(g), g.amin(dims).amin(), g.amax(dims).amax()


def _bn_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    # The dimensions a BatchNorm reduces over (all but the channels), and the shape that broadcasts a per-channel
    # vector against x.
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


@functools.cache
def _bn_kernels(shape: tuple[int, ...]) -> tuple:
    """The two BatchNorm kernels compiled for activations of this shape (batch size aside): each shape gets copies
    of the functions' code, so dynamo compiles each shape's kernels with static sizes (the fastest: with every
    size dynamic, ResNet-20's lat step was ~7% slower in one side-by-side prototype run, Intel Xeon VM), and
    the shapes of a net do not count against dynamo's limit of 8 recompiles of one function. A second batch size
    (an epoch's last batch) compiles one graph more, dynamic in the batch size only (dynamo's automatic dynamic
    shapes)."""
    return torch.compile(_code_copy(_bn_forward)), torch.compile(_code_copy(_bn_backward))


def _code_copy(f, **names):
    """`f` with a code object of its own (dynamo compiles, and counts recompiles, per code object), reading
    `names` over its module's globals."""
    return types.FunctionType(f.__code__.replace(), {**f.__globals__, **names} if names else f.__globals__,
                              f.__name__, f.__defaults__)


def bn_forward(x, weight, bias, running_mean, running_var, signs, scale, momentum: float, eps: float):
    """A BatchNorm's train-mode forward (running statistics updated in place) plus signs * scale where signs are
    given: (y, mean, 1 / std) in one compiled function."""
    return _run(_bn_kernels(tuple(x.shape[1:]))[0], x, weight, bias, running_mean, running_var, signs, scale,
                momentum, eps, kernels="fused")


def bn_backward(g, x, weight, mean, invstd, capture: bool):
    """The BatchNorm's backward: (grad x, grad weight, grad bias), then, where `capture`, Eq. 5's (int8 sign(g),
    min(g), max(g)), else three None; one compiled function."""
    return _run(_bn_kernels(tuple(x.shape[1:]))[1], g, x, weight, mean, invstd, capture, kernels="fused")


def _run(kernel, *args, kernels="compiled"):
    # A kernel of attach(kernels=...), unrecorded, autocast off; a compile error becomes one KernelsError line.
    try:
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            return kernel(*args)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        why = (str(e.inner_exception).strip().splitlines() or [""])[0]
        raise KernelsError(f"kernels={kernels!r} cannot compile its kernels here ({type(e.inner_exception).__name__}: "
                           f"{why}); use kernels='aten', the default") from e
