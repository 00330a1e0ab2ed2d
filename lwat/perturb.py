"""The method: perturbation points and Algorithm 1 of Sankaranarayanan et al. (AAAI 2018), top to bottom.

`attach(model, eps)` makes chosen modules of any `nn.Module` *perturbation points* (the paper's
gradient accumulation layers G_c). In train mode, on batch t, each point's output a becomes

    a + eps_l * r_l,   r_l = sign(dJ/da_l) cached in the backward pass of batch t-1      (Eq. 5, 6)

with eps_l = eps * (max(g) - min(g)) of that cached gradient g ("range", paper appendix) or
eps_l = eps ("fixed"). Nothing is added to the first batch after `attach`; eval mode is untouched.

How it is built, and why (each choice keeps torch.compile correct and the step cheap):
- A point is the module itself with its class swapped for a subclass whose `forward` adds the
  perturbation (not a module hook: dynamo does not guard on hooks, so a compiled graph of a plain
  instance could silently be reused for an attached one; it does guard on the class). The module's
  parameters, buffers and `state_dict()` keys stay exactly those of the plain model.
- The cache is one int8 buffer per point (r_l, 1 byte per activation element, in the activation's
  memory format) and one 0-dim fp32 eps_l, made by the first training pass of each activation
  shape and then overwritten in place (with `kernels="compiled"`, the signs are a new tensor each
  backward, in the same layout). They are plain attributes of the module instance, not
  parameters or buffers: DDP neither broadcasts nor averages them, so each rank perturbs with its
  own previous batch, as in the paper. Until the first backward, eps_l = 0: nothing is added.
- Eq. 6 is one in-place multiply-add on the point's output (a copy where the module's own backward
  reads its output). Eq. 5 is the backward of an identity autograd Function placed on that output:
  it reads dJ/da once where autograd computes it and writes the signs and eps_l into the cache, so
  under torch.compile it is traced into the compiled backward and fused with the layer's own
  gradient kernels. The one thing a compiled graph cannot do is make the cache; `lwat/_compile.py`
  sizes it before dynamo traces a pass (one graph break, on the first compiled pass of each input
  shape). `loss.backward()` and `torch.autograd.grad(loss, ...)` both refresh the cache.
- Eager, `kernels` chooses how Eq. 6 and Eq. 5 run: torch's ops, one compiled pass each, or ("fused")
  at a BatchNorm point the BatchNorm's forward and Eq. 6 as one compiled function and its backward and
  Eq. 5 as another (`_BatchNormEq56`), so that Eq. 6 needs no pass over the activation of its own.

Rules worth knowing (tested in tests/test_perturb.py and tests/test_perturb_semantics.py):
- Batch size: a smaller batch (the last one of an epoch without drop_last) is perturbed with the
  first n rows of the cached signs and does not refresh the cache; a larger batch or another
  activation shape is not perturbed and starts the cache afresh (if its backward refreshes it). So if
  the batch size shrinks for good, call `handle.reset()`, or the larger batch's signs serve every later
  one; and a point whose activation shape changes every batch (sequences padded to each batch's
  longest) is never perturbed: pad to a fixed length (a warning says so after 10 shape changes).
- A point runs once per forward pass: a module called twice in one forward (shared weights) perturbs
  both calls with one cache, which keeps the gradient of the call whose backward runs last (the first
  call). A point whose output needs no gradient (all before it frozen, the input without grad) is
  made to need one in eager mode, so Eq. 5 still gets dJ/da there (under torch.compile it gets none
  and is never perturbed).
- Several passes per step: each train-mode pass is perturbed with the cache as it is when the pass
  runs, and each backward overwrites it. Gradient accumulation (forward, backward per micro-batch)
  therefore perturbs micro-batch k with the signs of micro-batch k-1, the previous step's last
  micro-batch for the first one. Passes inside `handle.paused()` neither perturb nor refresh. A
  backward whose forward ran before the cache was made afresh (`reset()`, `load_state_dict()`,
  another activation shape) leaves the new cache alone.
- Activation checkpointing (torch.utils.checkpoint, reentrant or not): outputs, gradients and the
  cache equal those without checkpointing.
- `copy.deepcopy` of an attached model (and so `torch.optim.swa_utils.AveragedModel`'s copy) is an
  independent attached model holding a copy of the cache: in eval mode it computes the plain model;
  in train mode it perturbs with, and refreshes, its own copy, never the original's. Averaging
  touches parameters and buffers only, never the cache. Use `handle.detach()` before copying to
  get a plain copy.
- `torch.func.functional_call(model, params, x)` runs the points like a normal call: perturbed with
  the cache, refreshed by its backward.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lwat import _compile

SCALES = ("range", "fixed")
# Eager mode's Eq. 5 / Eq. 6: aten ops; two torch.compile'd one-pass kernels; or those, with each BatchNorm point's
# BatchNorm compiled together with them (lwat/_compile.py).
KERNELS = ("aten", "compiled", "fused")
DIRECTIONS = ("gradient", "random")  # "random": random signs, same eps_l (a control experiment)
_CHOICES = {"scale": SCALES, "direction": DIRECTIONS, "kernels": KERNELS}
_SETTINGS = ("eps", *_CHOICES)  # what a handle checks whenever it is set (`_setting`)

PointSelector = list[str] | tuple | type | Callable[[str, nn.Module], bool] | None


def attach(
    model: nn.Module,
    eps: float,
    *,
    scale: str = "range",
    points: PointSelector = None,
    depth: int | None = None,
    direction: str = "gradient",
    kernels: str = "aten",
) -> Handle:
    """Turn `model` into a layerwise adversarially trained model (Algorithm 1), in place.

    Args:
        model: any nn.Module.
        eps: perturbation strength. With scale="range", eps_l = eps * (max - min) of the cached
            gradient, so eps is relative to the gradient's spread; the paper used eps in {10, 20, 30}
            with a loss that is the mean over the batch (the gradient, hence eps_l, shrinks as
            1 / batch size, so these values are tied to that reduction and a batch of ~128).
            With scale="fixed", eps_l = eps in activation units.
        scale: "range" (paper appendix) or "fixed".
        points: which modules' outputs to perturb: a list of names from `model.named_modules()`;
            a module class or tuple of classes (`nn.LayerNorm`: every LayerNorm); or a callable
            `(name, module) -> bool`. Default: every BatchNorm layer; in a model with none, every
            Conv and every Linear except the last.
        depth: perturb only the first `depth` points (in `named_modules()` order), paper Table 6.
        direction: "gradient" (the method) or "random" (random signs with the same eps_l).
        kernels: how eager mode computes Eq. 6 and Eq. 5: "aten" (default: torch's own ops, two passes over
            memory each) or "compiled" (one torch.compile'd pass each; compiled on the first training step,
            a few seconds, and again for another dtype; needs what torch.compile needs, a C++ compiler on
            the CPU). The same numbers bit for bit (tested in fp32, fp64 and under bf16 autocast); README
            "Cost" measures the speed. "fused": as "compiled", and at a BatchNorm point (torch's BatchNorm1d,
            2d or 3d in train mode, with affine weights, running statistics and a momentum) the BatchNorm's
            forward with Eq. 6 and its backward with Eq. 5 as one compiled function each, so the method
            costs no pass of its own there (compiled once per activation shape); the BatchNorm's numbers
            then equal torch's within float rounding, not bit for bit. Under torch.compile of the model the
            kernels change nothing: the compiled step fuses the method into its own kernels.

    Returns:
        A `Handle`: `.points`, `.state_dict()`, `.load_state_dict()`, `.paused()`, `.detach()`; its `.eps`,
        `.scale`, `.direction` and `.kernels` may be changed later, checked as here.
    """
    settings = {name: _setting(name, value)
                for name, value in (("eps", eps), ("scale", scale), ("direction", direction), ("kernels", kernels))}
    modules = dict(model.named_modules())
    if any(isinstance(m, _Point) for m in modules.values()):
        raise ValueError("model already has perturbation points attached; detach() them first")
    names = select_points(model, points)
    lazy = [n for n in names if isinstance(modules[n], nn.modules.lazy.LazyModuleMixin)
            and modules[n].has_uninitialized_params()]
    if lazy:  # a lazy module replaces its own class on its first call, which would drop the point
        raise ValueError(f"{lazy[0]!r} is a lazy module not initialized yet; run one forward pass before attach")
    if depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= len(names):
            raise ValueError(f"depth must be in 1..{len(names)} (the number of points), got {depth}")
        names = names[:depth]
    return Handle(model, [(n, modules[n]) for n in names], **settings)


def _setting(name: str, value):
    """A handle setting (eps, scale, direction, kernels) checked, as `attach` and every later change see it."""
    if name == "eps":
        try:
            number = float(value)  # a Python or numpy number, or a 0-dim tensor
        except (TypeError, ValueError, RuntimeError):
            number = float("nan")
        if isinstance(value, (bool, str)) or not 0 <= number < float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
        return number
    known = _CHOICES[name]
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    return value


def default_points(model: nn.Module) -> list[str]:
    """Names of the default points: every BatchNorm; with none, every Conv and Linear but the last Linear."""
    named = list(model.named_modules())[1:]  # submodules only
    bns = [n for n, m in named if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns
    layers = [(n, m) for n, m in named if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    last_linear = [n for n, m in layers if isinstance(m, nn.Linear)][-1:]
    return [n for n, _ in layers if n not in last_linear]


def select_points(model: nn.Module, points: PointSelector = None) -> list[str]:
    """The module names, in `named_modules()` order, that `points` selects (see `attach`).

    Raises:
        ValueError: a name that is not in the model, a selector that matches nothing, or another type.
    """
    named = list(model.named_modules())[1:]  # the model itself is never a point: its submodules are
    if points is None:
        names, what = default_points(model), "the default (BatchNorm; else Conv and hidden Linear)"
    elif isinstance(points, (list, tuple)) and points and all(isinstance(p, str) for p in points):
        unknown = [p for p in points if p not in dict(named)]
        if unknown:
            raise ValueError(f"no submodule named {', '.join(map(repr, unknown))} in the model (points are "
                             "names from model.named_modules(), the model itself excluded)")
        return list(points)
    elif isinstance(points, type) or (isinstance(points, tuple) and points
                                      and all(isinstance(c, type) for c in points)):
        names = [n for n, m in named if isinstance(m, points)]
        what = " or ".join(c.__name__ for c in (points if isinstance(points, tuple) else (points,)))
    elif callable(points):
        names, what = [n for n, m in named if points(n, m)], f"the callable {getattr(points, '__name__', points)}"
    else:
        raise ValueError("points must be a non-empty list of module names, a module class or tuple of classes, "
                         f"or a callable (name, module) -> bool; got {points!r}")
    if not names:
        raise ValueError(f"no perturbation point found in {type(model).__name__}: points={what} matches no "
                         "module; pass points=[module names], a module class or a callable (name, module) -> bool")
    return names


# ---- Eq. 6: the forward pass of a point ------------------------------------------------------------

# Modules whose backward does not read their own output, so Eq. 6 may update that output in place: torch's own
# forward of these classes only (a subclass whose forward adds an activation, as timm's BatchNormAct2d, saves it).
_OUTPUT_NOT_SAVED = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)


# The BatchNorms kernels="fused" runs as compiled kernels: torch's own classes only (not SyncBatchNorm, not a subclass).
_FUSABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _output_not_saved(cls: type) -> bool:
    return issubclass(cls, _OUTPUT_NOT_SAVED) and cls.forward.__module__.startswith("torch.nn.modules.")


@dataclass(eq=False)
class _State:
    handle: Handle
    signs: torch.Tensor | None = None  # int8 r_l = sign(dJ/da) of the previous batch (Eq. 5), activation-shaped
    flat: torch.Tensor | None = None  # the same bytes as one 1-D tensor (see _graph_cache)
    scale: torch.Tensor | None = None  # 0-dim fp32 eps_l; 0 until the first backward
    layout: torch.memory_format = torch.contiguous_format  # of signs (that of the activation)
    reshaped: int = 0  # times a new activation shape (other than the batch size) replaced the cache
    made: int = 0  # caches made for this point (new shape, load_state_dict, ...): Eq. 5 replacing it does not count


_RESHAPED_WARN = 10  # warn once, at this many shape changes (each one costs the point one unperturbed batch)


# Kernels, chosen side by side (benchmarks/point_kernels.py: ResNet-20's 19 points at batch 128, 24.1M elements,
# CPU, 2 threads, best of 21; benchmarks/README.md). Eq. 6 casts the int8 signs to the activation's dtype first on the
# CPU only: there an elementwise op with an int8 operand and an fp32 output runs a scalar casting loop, slower
# than a vectorized cast into a temporary plus a same-dtype addcmul_ (14.7 vs 11.6 ms). A CUDA kernel casts in
# registers, so there the mixed-dtype addcmul_ stays one pass and one launch (not measured: no GPU was lent).
# Eq. 5 is aminmax, then sign() copied into the int8 cache (9.2 ms): fewer passes than the comparisons it
# replaced (gt - lt, five kernels, 26.0 ms) and torch._foreach_* over all points (a loop on the CPU, 38.3 ms).
# A channels-last g's range is taken over its memory seen as one 1-D tensor: with aminmax over the channels-last
# 4-D tensor itself, Eq. 5 takes 29.6 ms instead of 20.2 on the CPU (`point_kernels.py --channels-last`).
# 1 MiB slices that keep the fp32 temporaries in cache (6.8 and 7.9 ms) are faster alone but gained nothing
# measurable in whole training steps. One torch.compile'd pass per job is faster alone and, called unrecorded,
# in whole steps too: attach(kernels="compiled") (lwat/_compile.py; opt-in, as it compiles on the first steps and
# needs a C++ compiler on the CPU). kernels="fused" also compiles each BatchNorm point's BatchNorm with them, so
# Eq. 6 rides on the BatchNorm's own pass: ResNet-20 lat/baseline 1.02-1.05 against 1.13-1.17 with "aten" and
# 1.11-1.12 with "compiled" (four runs each, step_overhead.py, Intel Xeon VM, 2026-12-06; benchmarks/README.md). Under
# torch.compile of the model all of it fuses into the layers' own kernels.


class _Point(nn.Module):
    """Mixin placed in front of a point's own class: its forward, then Eq. 6 (and Eq. 5 in backward)."""

    def forward(self, *args, **kwargs):
        state = self._lwat
        handle = state.handle
        if self._lwat_batch_norm and handle.kernels == "fused" and _fusable(self, state, args, kwargs):
            return _fused_batch_norm(self, state, args[0])  # the BatchNorm, Eq. 6 and Eq. 5 as two compiled kernels
        out = super().forward(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            name = type(self).__name__.removeprefix("Perturbed")
            raise TypeError(f"lwat: a perturbation point must return one tensor; {name} returns "
                            f"{type(out).__name__} (choose the module that makes the activation to perturb)")
        if handle._sizing:  # lwat/_compile.py runs the model on the meta device to learn each point's shape
            # Inductor keeps a conv net's 4-D activations channels-last on the CPU: a cache in that layout is
            # read and written contiguously by the compiled kernels (the eager layout would be gathered).
            _fit_cache(state, out, handle._sizing, torch.channels_last if out.dim() == 4 else torch.contiguous_format)
            return out
        if not (self.training or handle.in_eval) or not (handle.perturb or handle.capture):
            return out
        # A point after frozen layers (nothing before it needs a gradient) still needs its own for Eq. 5 (eager).
        frozen = not out.requires_grad and handle.capture and torch.is_grad_enabled() and not _compile.is_compiling()
        capture = handle.capture and (out.requires_grad or frozen)
        if not _fits(state.signs, out.shape, out.device):  # no cache of this shape: unperturbed, new cache if captured
            if not capture:
                return out
            _fit_cache(state, out, out.device, _layout(out))
        n, in_place = out.shape[0], self._lwat_in_place
        full = n == state.signs.shape[0]
        compiling = _compile.is_compiling()  # then the graph gets the flat cache, and no Python state
        if handle.perturb:  # a smaller batch uses the first n rows of the signs
            if (handle.kernels != "aten" and in_place and not compiling
                    and out.is_contiguous(memory_format=state.layout)):  # one compiled pass (lwat/_compile.py)
                _compile.eq6(_flat(out, state.layout), state.flat[:out.numel()].detach(),
                             state.scale.to(out.dtype))  # Eq. 6
            else:
                rows = state.signs if full else state.signs[:n]
                if out.device.type == "cpu":  # see Kernels above
                    rows = rows.to(out.dtype)
                out = out.addcmul_(rows, state.scale) if in_place else torch.addcmul(out, rows, state.scale)  # Eq. 6
        if capture and full:  # smaller batches never refresh the cache
            if frozen:
                out = out.requires_grad_().clone()  # Eq. 5 marks its input dirty, which a leaf cannot be
            out = _Eq5.apply(out if in_place or handle.perturb else out.clone(),
                             _graph_cache(state) if compiling else None, state.scale if compiling else None,
                             handle._loss_scale, handle._eps if compiling else None, handle.scale, handle.direction,
                             state.layout, None if compiling else state,
                             compiling and _compile.may_overflow(handle, out))
        return out


@functools.cache
def _unwrapped(cls: type, attached: type, plain: type) -> type:
    """`cls` without a class attach made (`attached`, standing for `plain`). A wrapper that subclassed the attached
    class after attach (FSDP2's fully_shard makes FSDP<name>(FSDPModule, <the class it finds>)) keeps wrapping, around
    the plain class; any other change of class is refused."""
    if cls is attached:
        return plain
    if attached not in cls.__bases__:
        raise RuntimeError(f"cannot detach: {cls.__name__} replaced the class attach made ({attached.__name__}); "
                           "detach before changing a point's class")
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__.replace(attached.__name__, plain.__name__),
                tuple(plain if b is attached else b for b in cls.__bases__), body)


@functools.cache
def _point_class(cls: type) -> type:
    # One subclass per module class, reused, so compiled graphs are shared between instances.
    return type(f"Perturbed{cls.__name__}", (_Point, cls),
                {"__module__": cls.__module__, "_lwat_in_place": _output_not_saved(cls),
                 "_lwat_batch_norm": cls in _FUSABLE})


def _fits(signs: torch.Tensor | None, shape: torch.Size, device: torch.device) -> bool:
    # The cache serves an output of this shape: same shape but perhaps fewer rows, same device.
    return signs is not None and signs.shape[1:] == shape[1:] and shape[0] <= signs.shape[0] and signs.device == device


@torch.compiler.disable  # a compiled graph cannot make it (lwat/_compile.py makes it before dynamo traces)
def _fit_cache(state: _State, out: torch.Tensor, device: torch.device, layout: torch.memory_format) -> None:
    # A new, empty cache (eps_l = 0) for an output of this shape, unless the current one serves it; sizing for
    # torch.compile may also ask for another layout of the same values.
    if not _fits(state.signs, out.shape, device):
        _new_cache(state, out.shape, layout, device)
    elif state.layout != layout:
        _copy_cache(state, state.signs, state.scale, layout, device)


def _new_cache(state: _State, shape: torch.Size, layout: torch.memory_format, device: torch.device) -> None:
    if state.signs is not None and state.signs.shape[1:] != shape[1:]:
        state.reshaped += 1
        if state.reshaped == _RESHAPED_WARN:
            warnings.warn(f"lwat: a point's activation shape changed {state.reshaped} times ({tuple(shape)} now): a "
                          "batch whose activations differ in shape from the previous batch's is not perturbed "
                          "(dynamic padding of sequences does this every batch); pad to a fixed length",
                          stacklevel=2)
    state.flat = torch.zeros(shape.numel(), dtype=torch.int8, device=device)
    state.signs, state.layout = _unflatten(state.flat, shape, layout), layout
    state.made += 1
    state.scale = torch.zeros((), device=device)
    state.handle._make_scalars(device)


def _copy_cache(state: _State, signs: torch.Tensor, scale: torch.Tensor, layout: torch.memory_format,
                device: torch.device) -> None:
    # A new cache holding these signs and eps_l, in `layout` on `device`.
    _new_cache(state, signs.shape, layout, device)
    state.signs.copy_(signs)
    state.scale.copy_(scale)


def _graph_cache(state: _State) -> torch.Tensor:
    # The signs as a compiled graph gets them to write: a channels-last cache (as lwat/_compile.py sizes every 4-D
    # one) as its 4-D view, which has the BatchNorm backward's loop shape, so inductor can fuse the write into that
    # loop; any other as the flat 1-D tensor (torch 2.13: inductor may hand the backward a channels-last copy of a
    # 4-D input in another layout that it mutates there, and the write is lost).
    return state.signs if state.layout == torch.channels_last else state.flat


def _layout(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not t.is_contiguous() else torch.contiguous_format


def _flat(t: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    # A tensor dense in `layout` as one 1-D tensor on its memory, in memory order (the inverse of _unflatten).
    # Detached: not a view, so a compiled kernel given it guards on its length only, not on the view's base.
    return (t.permute(0, 2, 3, 1) if layout == torch.channels_last else t).view(-1).detach()


def _memory(t: torch.Tensor) -> torch.Tensor:
    # A dense channels-last t as one 1-D tensor in memory order, else t itself (a contiguous t is read in memory
    # order already; another t is left as it is).
    return _flat(t, torch.channels_last) if _layout(t) == torch.channels_last else t


def _unflatten(flat: torch.Tensor, shape: torch.Size, layout: torch.memory_format) -> torch.Tensor:
    if layout == torch.channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


# ---- Eq. 5: the backward pass of a point ------------------------------------------------------------

class _Eq5(torch.autograd.Function):
    """Identity in forward; in backward, dJ/da -> the point's cache (r_l and eps_l)."""

    @staticmethod
    def forward(ctx, out, signs, scale, loss_scale, eps, scale_kind, direction, layout, state, may_overflow):
        # Compiled (state None), the cache comes as tensors, the signs as _graph_cache gives them. Eager, the point's
        # _State comes instead (signs, scale, eps None): the backward writes the cache the point holds then, which
        # kernels="compiled" replaces with a new tensor each backward.
        ctx.cache = signs, scale, loss_scale, eps, scale_kind, direction, layout, state, may_overflow
        ctx.made = None if state is None else state.made
        ctx.mark_dirty(out)  # identity without a view: later in-place ops on the output stay legal
        return out

    @staticmethod
    def backward(ctx, g):
        signs, scale, loss_scale, eps, scale_kind, direction, layout, state, may_overflow = ctx.cache
        fused = None  # g's layout where Eq. 5 runs as one compiled pass (eager, kernels="compiled", g dense in it)
        if state is None:
            # Compiled: the graph cannot read Python state when it runs. It reads eps from the handle's eps tensor
            # and divides by its loss-scale tensor (which `eps = ...` and `grad_scale = ...` update in place; 1
            # without a scaler), and guards against an overflow where one may happen (see _compile.may_overflow).
            grad_scale, guard = loss_scale, may_overflow
            if signs.dim() == 1:
                signs = _unflatten(signs, g.shape, layout)
        else:
            cache = _eager_cache(state, ctx.made)
            if cache is None:
                return g, None, None, None, None, None, None, None, None, None
            signs, scale, eps, grad_scale, guard = cache
            if state.handle.kernels != "aten" and direction == "gradient":
                g_layout = _layout(g)
                fused = g_layout if g.is_contiguous(memory_format=g_layout) else None
        with torch.no_grad():
            new_signs = _cache_gradient(g, signs, scale, eps, grad_scale, guard, scale_kind, direction, fused)
            if fused is not None:
                _keep(state, new_signs)
            else:
                signs.copy_(new_signs)  # (fp32 sign() stored as int8; see benchmarks/point_kernels.py)
        return g, None, None, None, None, None, None, None, None, None


def _eager_cache(state: _State, made: int):
    # What an eager backward writes Eq. 5 into: the point's cache and settings as they are when it runs (eps too,
    # as a compiled graph reads it then), or None where another cache was made since its forward (reset,
    # load_state_dict, a new shape): that gradient's signs belong to no cache.
    if state.made != made or state.signs is None:
        return None
    grad_scale = state.handle.grad_scale  # the loss scale set for this backward, None without a GradScaler
    return state.signs, state.scale, state.handle.eps, grad_scale, grad_scale is not None


def _cache_gradient(g, signs, scale, eps, grad_scale, guard, scale_kind, direction, fused=None):
    # Eq. 5, with g = dJ/da at this point: eps_l written over the cache's scale in place, r_l = sign(g) returned
    # for the caller to store; `fused`, g's layout (eager, kernels="compiled"; g dense): one compiled pass, int8.
    if fused is not None:
        flat, lo, hi = _compile.eq5(_flat(g, fused))
        new_signs = _unflatten(flat, g.shape, fused)
    else:
        if _compile.is_compiling() and g.dim() > 2:
            # Per channel first: the same loops as a BatchNorm's own backward reductions, so inductor fuses them
            # (one pass over g, not two). The signs follow a per-channel reduction, so inductor computes them
            # after the reductions, in the BatchNorm's input-gradient loop, which with
            # _compile.compile_options() also writes them into the cache.
            per_channel, _ = _compile._bn_dims(g)
            if scale_kind == "range" or guard:
                # min and max are exact, so the range is the same; hi >= lo for any finite gradient (a channel
                # with a NaN gets 0 signs)
                lo_c, hi_c = g.amin(per_channel, keepdim=True), g.amax(per_channel, keepdim=True)
                lo, hi, ordered = lo_c.amin(), hi_c.amax(), hi_c >= lo_c
            else:  # eps_l = eps, and no guard reads the range: the signs follow the BatchNorm's own per-channel
                # sum instead (inductor computes it once for both; a channel whose sum is NaN gets 0), which
                # spares the min and max, about half of compiled lat's cost (benchmarks/README.md).
                total = g.sum(per_channel, keepdim=True)
                lo = hi = total.new_zeros(())
                ordered = total == total
        else:
            (lo, hi), ordered = torch.aminmax(_memory(g)), None  # see Kernels above
        if direction == "random":
            new_signs = torch.randint_like(signs, 0, 2).mul_(2).sub_(1)
        else:
            new_signs = torch.sign(g) if ordered is None else torch.where(ordered, torch.sign(g), 0)
    return _eq5_scale(new_signs, lo, hi, signs, scale, eps, grad_scale, guard, scale_kind)


def _eq5_scale(new_signs, lo, hi, signs, scale, eps, grad_scale, guard, scale_kind):
    # eps_l from the gradient's min `lo` and max `hi`, written over the cache's scale in place; returns the signs
    # to store: `new_signs`, or the cache's own `signs` where the guard finds the range not finite.
    spread = hi.float() - lo.float()  # fp32: an fp16 range can overflow
    if scale_kind == "range":
        new_scale = spread * eps  # eps_l = eps * (M - m), appendix
        if grad_scale is not None:  # a GradScaler's loss scale: eps_l uses the true gradient
            new_scale = new_scale / grad_scale
    else:
        new_scale = torch.zeros_like(spread) + eps  # eps: a float, or a 0-dim fp32 tensor when compiled
    if guard:
        # Under a GradScaler an fp16 step may overflow: inf/NaN gradients, a step the scaler skips. That gradient
        # must not poison the cache: where M - m is not finite, keep the previous signs and eps_l (with none
        # captured yet, eps_l stays 0: the next pass is unperturbed). torch.where, so no host sync.
        finite = torch.isfinite(spread)
        new_signs = torch.where(finite, new_signs, signs)
        new_scale = torch.where(finite, new_scale, scale)
    scale.copy_(new_scale)
    return new_signs


def _keep(state: _State, new: torch.Tensor) -> None:
    # kernels="compiled": Eq. 5's new signs become the point's cache when in its layout (a gradient normally has
    # the activation's), else they are copied into it.
    if new.is_contiguous(memory_format=state.layout):
        state.signs, state.flat = new, _flat(new, state.layout)
    else:
        state.signs.copy_(new)


# ---- kernels="fused": a BatchNorm point as two compiled kernels -------------------------------------------

def _fusable(bn: nn.Module, state: _State, args, kwargs) -> bool:
    # Whether this pass of a BatchNorm point runs as lwat/_compile.py's BatchNorm kernels: a train-mode BatchNorm
    # with what they assume (affine, running statistics, a momentum), one floating input, an eager pass that
    # perturbs or captures gradient signs, and a gradient to capture. Any other pass runs the eager point code.
    x = args[0] if len(args) == 1 and not kwargs else None
    handle = state.handle
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and x.numel() > x.shape[1]
            and bn.training and bn.affine and bn.track_running_stats and bn.momentum is not None
            and handle.direction == "gradient" and handle._sizing is None
            and not _compile.is_compiling() and torch.is_grad_enabled() and (x.requires_grad or bn.weight.requires_grad)
            and (handle.perturb or handle.capture) and (handle.capture or _fits(state.signs, x.shape, x.device)))


def _fused_batch_norm(bn: nn.Module, state: _State, x: torch.Tensor) -> torch.Tensor:
    # The eager point's rules (lwat/perturb.py's _Point), with the BatchNorm and Eq. 6 in one compiled forward.
    bn._check_input_dim(x)
    if not _fits(state.signs, x.shape, x.device):  # a new cache, eps_l 0: this pass adds nothing
        _fit_cache(state, x, x.device, _layout(x))
    n, handle = x.shape[0], state.handle
    full = n == state.signs.shape[0]
    # Detached: not a view (the first cache is one, later ones not), so the kernel does not guard on a view's base.
    signs = (state.signs if full else state.signs[:n]).detach() if handle.perturb else None
    bn.num_batches_tracked.add_(1)  # as torch's BatchNorm counts its train-mode passes
    return _BatchNormEq56.apply(x, bn.weight, bn.bias, bn, signs, state.scale,
                                state if handle.capture and full else None)  # smaller batches never capture


class _BatchNormEq56(torch.autograd.Function):
    """A train-mode BatchNorm with Eq. 6 (where signs are given) in one compiled forward; in backward, its
    gradients with Eq. 5 into the point's cache (where a _State is given) in one compiled backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn, signs, scale, state):
        # The running statistics updated through .data, as torch's BatchNorm updates them: unversioned, so a
        # backward of another pass that saved them (a joint loss's clean pass) still runs.
        y, mean, invstd = _compile.bn_forward(x, weight, bias, bn.running_mean.data, bn.running_var.data, signs,
                                              scale, bn.momentum, bn.eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.state = state
        ctx.made, ctx.scale_kind = (None, None) if state is None else (state.made, state.handle.scale)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, mean, invstd = ctx.saved_tensors
        cache = None if ctx.state is None else _eager_cache(ctx.state, ctx.made)
        grad_x, grad_weight, grad_bias, new_signs, lo, hi = _compile.bn_backward(g, x, weight, mean, invstd,
                                                                                 cache is not None)
        if cache is not None:
            _keep(ctx.state, _eq5_scale(new_signs, lo, hi, *cache, ctx.scale_kind))
        return grad_x, grad_weight, grad_bias, None, None, None, None


# ---- The handle ------------------------------------------------------------------------------------

class Handle:
    """What `attach` returns: the points, their cache, and the switches of the method.

    `eps`, `scale`, `direction` and `kernels` may be changed between steps (`handle.eps = 20`, a schedule); a
    value `attach` would refuse is refused here too, with the same ValueError. Eq. 5 reads eps when the backward
    runs (eager and compiled alike): an eps set between a forward and its backward makes that backward's eps_l.
    """

    def __setattr__(self, name, value):
        super().__setattr__(name, _setting(name, value) if name in _SETTINGS else value)
        if name == "eps" and getattr(self, "_eps", None) is not None:
            self._eps.data.fill_(self.eps)  # in place, through .data: as grad_scale's tensor below

    def __init__(self, model, named_modules, eps, scale, direction, kernels):
        self.eps, self.scale, self.direction, self.kernels = eps, scale, direction, kernels
        self.points = [n for n, _ in named_modules]
        self._grad_scale = None  # see the grad_scale property
        self._loss_scale = None  # grad_scale as a 0-dim fp32 tensor on the cache's device (1 without a scaler)
        self._eps = None  # eps as one too, for compiled graphs: a new eps (a schedule) then compiles nothing again
        self.perturb = True  # add eps_l * r_l in this pass
        self.capture = True  # refresh the cache from this pass's gradient
        self.in_eval = False  # also act in eval mode (test-time attack, paper Section 3.3)
        self._sizing = None  # a device while lwat/_compile.py sizes the cache (meta pass)
        self._sized_for = None  # the input shapes the cache was last sized for under torch.compile
        self._modules = dict(named_modules)
        for module in self._modules.values():
            module._lwat = _State(self)
            module.__class__ = _point_class(type(module))
        # The attached module itself sizes the cache before dynamo traces a pass (lwat/_compile.py).
        self._model, self._model_class = model, type(model)
        model._lwat_handle = self
        model.__class__ = self._model_attached = _compile.sizing_class(type(model))

    @property
    def grad_scale(self) -> torch.Tensor | None:
        """A GradScaler's loss scale as a tensor (`scaler.scale(torch.ones(()))`), set before each backward,
        so eps_l comes from the unscaled gradient; None (default) without a scaler."""
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value: torch.Tensor | None) -> None:
        self._grad_scale = value
        if self._loss_scale is not None:
            # In place, and through .data so no autograd version counter moves: a compiled backward of a
            # forward that ran before this assignment reads the value when it runs.
            self._loss_scale.data.copy_(1.0 if value is None else value)

    def _make_scalars(self, device: torch.device) -> None:
        # The tensors a compiled graph reads instead of the Python numbers it would otherwise guard on.
        if self._loss_scale is None or self._loss_scale.device != device:
            self._loss_scale = torch.ones((), device=device)
            if self._grad_scale is not None:
                self._loss_scale.copy_(self._grad_scale)
            self._eps = torch.tensor(self.eps, dtype=torch.float32, device=device)

    def detach(self) -> None:
        """Remove every point: the model is exactly the plain model again."""
        if not self._modules:  # detached already
            return
        # Compute every plain class first, so a refusal changes nothing.
        points = {m: next(c for c in type(m).__mro__ if c.__bases__[:1] == (_Point,)) for m in self._modules.values()}
        plain = {m: _unwrapped(type(m), p, p.__bases__[1]) for m, p in points.items()}
        plain[self._model] = _unwrapped(type(self._model), self._model_attached, self._model_class)
        for module, cls in plain.items():
            module.__class__ = cls
        del self._model._lwat_handle
        for module in self._modules.values():
            del module._lwat
        self._modules = {}

    @contextlib.contextmanager
    def paused(self, capture: bool = False):
        """Passes inside add no perturbation and leave the cache alone (a joint loss's clean pass).

        capture=True still records these passes' gradients as the next cache (FGS-inter's clean pass).
        """
        saved = self.perturb, self.capture
        self.perturb, self.capture = False, capture
        try:
            yield self
        finally:
            self.perturb, self.capture = saved

    @contextlib.contextmanager
    def evaluating(self):
        """Perturb and capture in eval mode too: the previous-batch test-time attack (Section 3.3)."""
        saved, self.in_eval = self.in_eval, True
        try:
            yield self
        finally:
            self.in_eval = saved

    def reset(self) -> None:
        """Forget the cache: the next pass is unperturbed, like the first batch after attach."""
        for module in self._modules.values():
            module._lwat.signs = module._lwat.flat = module._lwat.scale = None
        self._sized_for = None

    def state_dict(self) -> dict:
        """A copy of the cache, for checkpoints: {point name: {"signs": int8 tensor, "scale": 0-dim tensor}}.

        Both are None for a point that has not run a training pass yet."""
        def copy(t):
            return None if t is None else t.clone(memory_format=torch.preserve_format)
        return {n: {"signs": copy(m._lwat.signs), "scale": copy(m._lwat.scale)} for n, m in self._modules.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cache saved by `state_dict()`; the next train pass is perturbed with it."""
        if set(state) != set(self._modules):
            raise ValueError(f"cache has points {sorted(state)}, the model has {sorted(self._modules)}")
        for name, module in self._modules.items():
            signs, scale = state[name]["signs"], state[name]["scale"]
            cache = module._lwat
            if signs is None:
                cache.signs = cache.flat = cache.scale = None
                continue
            device = next(itertools.chain(module.parameters(), module.buffers()), signs).device  # the point's
            _copy_cache(cache, signs, scale, _layout(signs), device)
        self._sized_for = None
