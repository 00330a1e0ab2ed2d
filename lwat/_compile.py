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

In the middle, `compile_options()`: inductor's fusion rule with each point's cache write fused into its own
backward loop. The end of the file holds the kernels of an eager model's `attach(kernels="compiled")` (Eq. 6
and Eq. 5, one compiled pass each) and of `attach(kernels="fused")` (a BatchNorm point's forward with Eq. 6,
its backward with Eq. 5).

Torch APIs used: public ones (torch.compile, torch.compiler.is_compiling, torch.compiler.disable,
torch.func.functional_call, the meta device) and private ones: `torch.utils._pytree` (tree_leaves,
tree_map: the tensors inside nested inputs), `torch._dynamo.exc.BackendCompilerFailed` (the kernels' compile
error), `torch._inductor.list_mode_options` and, for `compile_options()`, inductor's scheduler (listed there).
Tested on torch 2.13.0.

A torch 2.13 inductor behaviour this design works around (see `_Eq5` in perturb.py): when a graph input is
read in the forward and mutated in the backward, inductor's layout optimization may hand the backward a
channels-last copy of a 4-D input instead of the input itself, and the mutation never reaches the caller's
tensor. A 4-D cache is therefore sized channels-last (inductor's layout for a conv net's activations, so there is
nothing to convert), and any other cache is given to the compiled graph as one flat 1-D tensor (perturb.py's
`_graph_cache`).
"""

from __future__ import annotations

import functools
import itertools
import types
import warnings

import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V
from torch.utils._pytree import tree_leaves, tree_map

is_compiling = torch.compiler.is_compiling


class _Sizing(nn.Module):
    """Mixin placed in front of the attached module's own class: under torch.compile, its forward first sizes
    the cache for these inputs (a class, not a forward pre-hook: dynamo guards on a module's class, not on its
    hooks, so compiled code that made the cache for an attached module is never reused for a plain one); its
    `compile()` adds `compile_options()`."""

    def compile(self, *args, **kwargs):
        """nn.Module.compile, with inductor compiling this model's graphs by lwat's fusion rule (compile_options)."""
        super().compile(*args, **with_compile_options(kwargs))

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


# ---- Inductor's fusion of the cache writes ----------------------------------------------------------------------
# Under torch.compile the backward graph writes each point's new signs into its cache, a graph input, and
# AOTAutograd places every write into a graph input at the end of the graph. Inductor does not fuse two loops whose
# nodes lie more than 64 apart in the graph's order (Scheduler.are_long_distant_nodes, a guard against longer
# buffer lifetimes), so every point's write but the last few's runs as a loop of its own that reads the gradient's
# inputs again, instead of in the BatchNorm backward's loop that has dJ/da in registers (benchmarks/README.md: compiled
# ResNet-20's backward kernels +10-12 ms over the baseline's under that guard, +4-6 ms with it lifted). lwat's
# rule lifts the distance guard for a write into a graph input only: such a write keeps what it reads alive to the
# end of the graph, so running it earlier can only end those lifetimes sooner. It is a torch.compile option, for
# the graphs of the model compiled with it only. Private inductor APIs used (torch 2.13.0): the documented
# extension point torch._inductor.choices.InductorChoices (can_fuse_horizontal, uuid) and inductor_choices_class
# option, config.score_fusion_memory_threshold, V.graph.graph_inputs, Scheduler.mutation_real_name, and the
# scheduler nodes' get_nodes() / get_outputs() / get_mutations(). A torch without them compiles by inductor's own
# rule.

class _FusionChoices(InductorChoices):
    """Inductor's heuristics, but in a graph compiled with compile_options() a loop that writes into a graph input
    may fuse with a distant loop."""

    def uuid(self) -> str:  # in inductor's cache keys, made while the graph compiles
        return f"lwat._compile._FusionChoices 1, rule {_lwat_rule()}"

    @staticmethod
    def can_fuse_horizontal(scheduler, node1, node2, shared_data_score: int) -> bool:
        if (_lwat_rule() and shared_data_score >= inductor_config.score_fusion_memory_threshold
                and (_writes_input(scheduler, node1) or _writes_input(scheduler, node2))):
            return True  # what inductor's rule would answer, but for the distance guard
        return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)


def _lwat_rule() -> bool:
    return inductor_config.inductor_choices_class is _FusionChoices  # the graph compiling now has compile_options()


def _writes_input(scheduler, node) -> bool:
    try:
        inputs = V.graph.graph_inputs
        return any(scheduler.mutation_real_name.get(name, name) in inputs
                   for n in node.get_nodes() for buf in n.get_outputs() for name in buf.get_mutations())
    except AttributeError:  # another torch's scheduler: inductor's own rule
        return False


def _fusion_choices() -> InductorChoices:
    return _FusionChoices()  # for a graph compiled without compile_options(), inductor's own heuristics


def compile_options() -> dict:
    """Inductor options for compiling an attached model: `torch.compile(model, options=lwat.compile_options())`.
    With them inductor may fuse each point's cache write into the point's own backward loop (see above): the same
    signs, and the rest equal to eager as closely as without them (tested). `model.compile()` of the attached model
    adds them itself."""
    # Inductor makes each thread's heuristics object once, from the option as it is when the thread first
    # compiles, and reads the option no more; so lwat's object, which applies its rule only to a graph compiled
    # with this option, becomes the process's default and this thread's where inductor's own is in use.
    if inductor_config.inductor_choices_class is None:
        inductor_config.inductor_choices_class = _fusion_choices
    if type(V.choices) is InductorChoices:
        V.set_choices_handler(_FusionChoices())
    return {"inductor_choices_class": _FusionChoices}


def with_compile_options(kwargs: dict) -> dict:
    """torch.compile's keyword arguments with compile_options() added where inductor compiles (the default backend):
    a `mode` becomes its options (torch.compile takes one or the other); a user's own choices class is kept."""
    if kwargs.get("backend", "inductor") != "inductor":
        return kwargs
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode", None)
    options = torch._inductor.list_mode_options(mode or "default", kwargs.get("dynamic"))
    return {**kwargs, "options": {**options, **compile_options(), **(kwargs.get("options") or {})}}


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
    # benchmarks/README.md).
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
