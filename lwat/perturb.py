"""The method: perturbation points and Algorithm 1 of Sankaranarayanan et al. (AAAI 2018), top to bottom.

`attach(model, eps)` makes chosen modules of any `nn.Module` *perturbation points* (the paper's gradient
accumulation layers G_c). In train mode, on batch t, each point's output a becomes

    a + eps_l * r_l,   r_l = sign(dJ/da_l) cached in the backward pass of batch t-1      (Eq. 5, 6)

with eps_l = eps * (max(g) - min(g)) of that cached gradient g ("range", paper appendix) or eps_l = eps
("fixed"). Nothing is added to the first batch after `attach`; eval mode is untouched.

A point is the module itself, its class swapped for a subclass whose `forward` adds Eq. 6 (lwat/_classes.py); Eq. 5
is the backward of an identity autograd Function; the cache is lwat/cache.py's. Speed and torch.compile code is
imported when used (lwat/_compile.py, _fused.py, _inductor.py). Rules for edge cases: docs/semantics.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from lwat import _classes, cache

SCALES = ("range", "fixed")
# How eager mode runs a BatchNorm point: torch's own ops, or its BatchNorm with Eq. 6 / Eq. 5 compiled together.
KERNELS = ("aten", "fused")
DIRECTIONS = ("gradient", "random")  # "random": random signs, same eps_l (a control experiment)
_CHOICES = {"scale": SCALES, "direction": DIRECTIONS, "kernels": KERNELS}
_SETTINGS = ("eps", *_CHOICES)  # what a handle checks whenever it is set

# Modules whose backward does not read their own output, so Eq. 6 may update it in place: torch's own forward only.
_OUTPUT_NOT_SAVED = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)
_FUSABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # kernels="fused": torch's own classes, no subclass

PointSelector = list[str] | tuple | type | Callable[[str, nn.Module], bool] | None


def attach(model: nn.Module, eps: float, *, scale: str = "range", points: PointSelector = None,
           depth: int | None = None, direction: str = "gradient", kernels: str = "aten") -> Handle:
    """Turn `model` into a layerwise adversarially trained model (Algorithm 1), in place.

    Args:
        model: any nn.Module.
        eps: perturbation strength. scale="range": eps_l = eps * (max - min) of the cached gradient (the paper
            used eps in {10, 20, 30} with a batch-mean loss at batch ~128); scale="fixed": eps_l = eps.
        scale: "range" (paper appendix) or "fixed".
        points: a list of names from `model.named_modules()`, a module class or tuple of classes, or a callable
            `(name, module) -> bool`. Default: every BatchNorm; with none, every Conv and Linear but the last.
        depth: perturb only the first `depth` points (in `named_modules()` order), paper Table 6.
        direction: "gradient" (the method) or "random" (random signs with the same eps_l).
        kernels: eager mode only. "aten" (default): torch's ops. "fused": a train-mode BatchNorm point (torch's,
            affine, running statistics) runs Eq. 6 and Eq. 5 inside compiled BatchNorm kernels (lwat/_fused.py):
            faster, needs a C++ compiler on the CPU, equal within float rounding.

    Returns:
        A `Handle`: `.points`, `.state_dict()`, `.load_state_dict()`, `.paused()`, `.reset()`, `.detach()`;
        `.eps`, `.scale`, `.direction` and `.kernels` may be changed later, checked as here.
    """
    settings = {k: _setting(k, v) for k, v in dict(eps=eps, scale=scale, direction=direction, kernels=kernels).items()}
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


def handle_of(model: nn.Module) -> Handle:
    """The `Handle` of the attached module in `model` (the module itself, or inside a wrapper such as
    `AveragedModel` or a copy made with `copy.deepcopy`). Raises ValueError where there is none or several."""
    handles = [m._lwat_handle for m in model.modules() if "_lwat_handle" in vars(m)]
    if len(handles) != 1:
        raise ValueError(f"{type(model).__name__} holds {len(handles)} attached models; handle_of needs exactly one")
    return handles[0]


def _setting(name: str, value):
    if name == "eps":
        try:
            number = float(value)  # a Python or numpy number, or a 0-dim tensor
        except (TypeError, ValueError, RuntimeError):
            number = float("nan")
        if isinstance(value, (bool, str)) or not 0 <= number < float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
        return number
    if not isinstance(value, str) or value not in _CHOICES[name]:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(_CHOICES[name])}")
    return value


def default_points(model: nn.Module) -> list[str]:
    """Names of the default points: every BatchNorm; with none, every Conv and Linear but the last Linear."""
    named = list(model.named_modules())[1:]
    bns = [n for n, m in named if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns
    layers = [(n, m) for n, m in named if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    last_linear = [n for n, m in layers if isinstance(m, nn.Linear)][-1:]
    return [n for n, _ in layers if n not in last_linear]


def select_points(model: nn.Module, points: PointSelector = None) -> list[str]:
    """The module names, in `named_modules()` order, that `points` selects (see `attach`). ValueError for a name
    not in the model, a selector that matches nothing, or another type."""
    named = list(model.named_modules())[1:]  # the model itself is never a point
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

class _Point(nn.Module):
    """Mixin placed in front of a point's own class: its forward, then Eq. 6 (and Eq. 5 in backward)."""

    def forward(self, *args, **kwargs):
        state = self._lwat
        handle = state.handle
        if self._lwat_batch_norm and handle.kernels == "fused":
            from lwat import _fused  # only with kernels="fused"
            if _fused.fusable(self, state, args, kwargs):
                return _fused.batch_norm(self, state, args[0])
        out = super().forward(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            name = type(self).__name__.removeprefix("Perturbed")
            raise TypeError(f"lwat: a perturbation point must return one tensor; {name} "
                            f"returns {type(out).__name__} (choose the module that makes the activation to perturb)")
        if handle._sizing:  # lwat/_compile.py runs the model on the meta device to learn each point's shape
            cache.fit(state, out, handle._sizing, torch.channels_last if out.dim() == 4 else torch.contiguous_format)
            return out
        if not (self.training or handle.in_eval) or not (handle.perturb or handle.capture):
            return out
        compiling = torch.compiler.is_compiling()  # then the graph gets the cache as tensors, no Python state
        # A point after frozen layers (nothing before it needs a gradient) still needs its own for Eq. 5 (eager).
        frozen = not out.requires_grad and handle.capture and torch.is_grad_enabled() and not compiling
        capture = handle.capture and (out.requires_grad or frozen)
        if not cache.fits(state.signs, out.shape, out.device):  # no cache of this shape: unperturbed, new if captured
            if not capture:
                return out
            if compiling:
                from lwat import _compile  # a graph break: the sizing pass did not foresee this shape
                _compile.fit_cache(state, out, out.device, cache.layout_of(out))
            else:
                cache.fit(state, out, out.device, cache.layout_of(out))
        n, in_place = out.shape[0], self._lwat_in_place
        full = n == state.signs.shape[0]
        if handle.perturb:  # a smaller batch uses the first n rows of the signs
            rows = state.signs if full else state.signs[:n]
            if out.device.type == "cpu":  # a vectorized cast, then a same-dtype addcmul (benchmarks/README.md)
                rows = rows.to(out.dtype)
            out = out.addcmul_(rows, state.scale) if in_place else torch.addcmul(out, rows, state.scale)  # Eq. 6
        if capture and full:  # smaller batches never refresh the cache
            if frozen:
                out = out.requires_grad_().clone()  # Eq. 5 marks its input dirty, which a leaf cannot be
            out = out if in_place or handle.perturb else out.clone()
            if compiling:  # the graph gets the cache as tensors: it cannot read Python state when it runs
                from lwat import _compile
                out = _compile.Eq5.apply(out, *_compile.graph_cache(state, handle, out))
            else:
                out = _Eq5.apply(out, state)
        return out


class _Attached(nn.Module):
    """Mixin in front of the attached model's class: compiled, it sizes the cache first (lwat/_compile.py)."""

    def forward(self, *args, **kwargs):
        handle = self._lwat_handle
        if (torch.compiler.is_compiling() and (self.training or handle.in_eval) and handle.capture
                and torch.is_grad_enabled()):
            shapes = tuple(tuple(t.shape) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            if shapes != handle._sized_for:  # guarded by dynamo: later passes of these shapes trace nothing here
                from lwat import _compile
                _compile.size_cache(handle, self, args, kwargs, shapes)
        return super().forward(*args, **kwargs)


# ---- Eq. 5: the backward pass of a point ------------------------------------------------------------

class _Eq5(torch.autograd.Function):
    """Identity in forward; in backward, dJ/da -> the point's cache (r_l and eps_l), eager (compiled: _compile.Eq5)."""

    @staticmethod
    def forward(ctx, out, state):
        ctx.state, ctx.made, ctx.kind = state, state.made, (state.handle.scale, state.handle.direction)
        ctx.mark_dirty(out)  # identity without a view: later in-place ops on the output stay legal
        return out

    @staticmethod
    def backward(ctx, g):
        target = _eager_cache(ctx.state, ctx.made)  # the cache as it is when the backward runs
        if target is not None:
            with torch.no_grad():
                target[0].copy_(_cache_gradient(g, *target, *ctx.kind))  # fp32 sign() stored as int8
        return g, None


def _eager_cache(state: cache.PointCache, made: int):
    # The cache as it is when an eager backward runs; None where another was made since its forward (reset, new shape).
    if state.made != made or state.signs is None:
        return None
    grad_scale = state.handle.grad_scale  # the loss scale set for this backward, None without a GradScaler
    return state.signs, state.scale, state.handle.eps, grad_scale, grad_scale is not None


def _cache_gradient(g, signs, scale, eps, grad_scale, guard, scale_kind, direction, lo_hi_ordered=None):
    # Eq. 5 with g = dJ/da: eps_l written over the cache's scale in place; r_l = sign(g) returned to be stored.
    flat = g.permute(0, 2, 3, 1).reshape(-1) if cache.layout_of(g) == torch.channels_last else g  # memory order
    lo, hi, ordered = lo_hi_ordered or (*torch.aminmax(flat), None)
    if direction == "random":
        new_signs = torch.randint_like(signs, 0, 2).mul_(2).sub_(1)
    else:
        new_signs = torch.sign(g) if ordered is None else torch.where(ordered, torch.sign(g), 0)
    return _eq5_scale(new_signs, lo, hi, signs, scale, eps, grad_scale, guard, scale_kind)


def _eq5_scale(new_signs, lo, hi, signs, scale, eps, grad_scale, guard, scale_kind):
    # eps_l from the gradient's min and max, written over the cache's scale; returns the signs to store.
    spread = hi.float() - lo.float()  # fp32: an fp16 range can overflow
    if scale_kind == "range":
        new_scale = spread * eps  # eps_l = eps * (M - m), appendix
        if grad_scale is not None:  # a GradScaler's loss scale: eps_l uses the true gradient
            new_scale = new_scale / grad_scale
    else:
        new_scale = torch.zeros_like(spread) + eps  # eps: a float, or a 0-dim fp32 tensor when compiled
    if guard:  # an overflowed fp16 step (which the scaler skips) keeps the previous cache; no host sync
        finite = torch.isfinite(spread)
        new_signs, new_scale = torch.where(finite, new_signs, signs), torch.where(finite, new_scale, scale)
    scale.copy_(new_scale)
    return new_signs


# ---- The handle ------------------------------------------------------------------------------------

class Handle:
    """What `attach` returns: the points, their cache, and the switches of the method.

    `eps`, `scale`, `direction` and `kernels` may be changed between steps (`handle.eps = 20`); a value `attach`
    would refuse is refused here too. Eq. 5 reads eps when the backward runs, eager and compiled alike.
    `grad_scale`: with a GradScaler, its loss scale as a tensor (`scaler.scale(torch.ones(()))`), set before each
    backward, so that eps_l comes from the unscaled gradient; None (default) without one.
    """

    def __setattr__(self, name, value):
        super().__setattr__(name, _setting(name, value) if name in _SETTINGS else value)
        # A compiled graph reads eps and the loss scale as 0-dim tensors when it runs: updated in place, via .data.
        if name == "eps" and vars(self).get("_eps") is not None:
            self._eps.data.fill_(self.eps)
        if name == "grad_scale" and vars(self).get("_loss_scale") is not None:
            self._loss_scale.data.copy_(1.0 if value is None else value)

    def __init__(self, model, named_modules, eps, scale, direction, kernels):
        self.eps, self.scale, self.direction, self.kernels = eps, scale, direction, kernels
        self.points = [n for n, _ in named_modules]
        self._loss_scale = self._eps = None  # grad_scale and eps as 0-dim fp32 tensors, for compiled graphs
        self.grad_scale = None  # a GradScaler's loss scale (see the class docstring)
        self.perturb = True  # add eps_l * r_l in this pass
        self.capture = True  # refresh the cache from this pass's gradient
        self.in_eval = False  # also act in eval mode (test-time attack, paper Section 3.3)
        self._sizing = self._sized_for = None  # lwat/_compile.py's: its meta pass's device, the shapes it sized for
        self._modules, self._model = dict(named_modules), model
        for module in self._modules.values():
            cls = type(module)
            in_place = issubclass(cls, _OUTPUT_NOT_SAVED) and cls.forward.__module__.startswith("torch.nn.modules.")
            module._lwat = cache.PointCache(self)
            module.__class__ = _classes.subclass(cls, _Point, f"Perturbed{cls.__name__}", _lwat_in_place=in_place,
                                                 _lwat_batch_norm=cls in _FUSABLE)
        model._lwat_handle = self  # the model's class keeps its name: frameworks that record it see the same
        model.__class__ = _classes.subclass(type(model), _Attached, type(model).__name__,
                                            __qualname__=type(model).__qualname__)

    def _make_scalars(self, device: torch.device) -> None:
        if self._loss_scale is None or self._loss_scale.device != device:
            self._loss_scale = torch.ones((), dtype=torch.float32, device=device)
            if self.grad_scale is not None:
                self._loss_scale.copy_(self.grad_scale)
            self._eps = torch.tensor(self.eps, dtype=torch.float32, device=device)

    def detach(self) -> None:
        """Remove every point: the model is exactly the plain model again."""
        if not self._modules:
            return
        _classes.restore({**dict.fromkeys(self._modules.values(), _Point), self._model: _Attached})
        del self._model._lwat_handle
        for module in self._modules.values():
            del module._lwat
        self._modules = {}

    def paused(self, capture: bool = False):
        """Passes inside add no perturbation and leave the cache alone (a joint loss's clean pass, update_bn);
        capture=True still records their gradients as the next cache (FGS-inter's clean pass)."""
        return self._switched(perturb=False, capture=capture)

    def evaluating(self):
        """Perturb and capture in eval mode too: the previous-batch test-time attack (Section 3.3)."""
        return self._switched(in_eval=True)

    @contextlib.contextmanager
    def _switched(self, **switches):
        saved = {k: getattr(self, k) for k in switches}
        vars(self).update(switches)
        try:
            yield self
        finally:
            vars(self).update(saved)

    def reset(self) -> None:
        """Forget the cache: the next pass is unperturbed, like the first batch after attach."""
        for module in self._modules.values():
            cache.clear(module._lwat)
        self._sized_for = None

    def state_dict(self) -> dict:
        """A copy of the cache: {point name: {"signs": int8 tensor, "scale": 0-dim fp32 tensor}}, both None for a
        point that has not run a training pass yet."""
        return cache.copy(self._modules)

    def load_state_dict(self, state: dict) -> None:
        """Restore a cache saved by `state_dict()`; the next train pass is perturbed with it."""
        cache.load(self._modules, state)
        self._sized_for = None
