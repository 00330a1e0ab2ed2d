"""The method: perturbation points and Algorithm 1 of Sankaranarayanan et al. (AAAI 2018), top to bottom.

`attach(model, eps)` makes chosen modules of any `nn.Module` *perturbation points* (the paper's
gradient accumulation layers G_c). In train mode, on batch t, each point's output a becomes

    a + eps_l * r_l,   r_l = sign(dJ/da_l) cached in the backward pass of batch t-1      (Eq. 5, 6)

with eps_l = eps * (max(g) - min(g)) of that cached gradient g ("range", paper appendix) or
eps_l = eps ("fixed"). Nothing is added to the first batch after `attach`; eval mode is untouched.

How the gradient is read, and why this design (each choice keeps torch.compile correct):
- A point is the module itself with its class swapped for a subclass whose `forward` adds the
  perturbation (no module hooks: dynamo does not guard on them, so a compiled graph of a plain
  instance would silently be reused for an attached one; it does guard on the class). The module's
  parameters, buffers and `state_dict()` keys stay exactly those of the plain model.
- Eager: a tensor hook on the point's output receives dJ/da during backward and turns it into
  int8 signs and one scale (no extra pass over the activation; Eq. 6 is one in-place addcmul_).
- Compiled: a hook registered inside a compiled graph would break it, so the output gets a zero
  "sink" leaf added instead, whose gradient reaches Eq. 5 in the eager autograd engine; that
  machinery (and the private torch APIs it needs) is in `lwat/_compile.py`.
- The cache between steps is int8 signs (1 byte per activation element, the activation's device
  and memory format) plus one 0-dim scale per point. It is plain attributes of the module
  instance, not parameters or buffers: DDP neither broadcasts nor averages it, so each rank
  perturbs with its own previous batch, as in the paper.

Rule for a batch whose size differs from the cached one: a smaller batch (the last one of an epoch
without drop_last) is perturbed with the first n rows of the cached signs and does not refresh the
cache; a larger batch or another activation shape is not perturbed and starts the cache afresh.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from lwat import _compile

SCALES = ("range", "fixed")
DIRECTIONS = ("gradient", "random")  # "random": random signs, same eps_l (a control experiment)


def attach(
    model: nn.Module,
    eps: float,
    *,
    scale: str = "range",
    points: list[str] | None = None,
    depth: int | None = None,
    direction: str = "gradient",
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
        points: names from `model.named_modules()` after whose output to perturb. Default: every
            BatchNorm layer; in a model with none, every Conv and every Linear except the last.
        depth: perturb only the first `depth` points (in `named_modules()` order), paper Table 6.
        direction: "gradient" (the method) or "random" (random signs with the same eps_l).

    Returns:
        A `Handle`: `.points`, `.state_dict()`, `.load_state_dict()`, `.paused()`, `.detach()`.
    """
    try:
        value = float(eps)  # a Python or numpy number, or a 0-dim tensor
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if isinstance(eps, bool) or not 0 <= value < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    modules = dict(model.named_modules())
    if any(isinstance(m, _Point) for m in modules.values()):
        raise ValueError("model already has perturbation points attached; detach() them first")
    names = default_points(model) if points is None else list(points)
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"no module named {', '.join(map(repr, unknown))} in the model")
    if not names:
        raise ValueError(f"no perturbation point found in {type(model).__name__}: it has no "
                         "BatchNorm, Conv or hidden Linear layer; pass points=[module names]")
    if depth is not None:
        if not 1 <= depth <= len(names):
            raise ValueError(f"depth must be in 1..{len(names)} (the number of points), got {depth}")
        names = names[:depth]
    return Handle(model, [(n, modules[n]) for n in names], value, scale, direction)


def default_points(model: nn.Module) -> list[str]:
    """Names of the default points: every BatchNorm; with none, every Conv and Linear but the last Linear."""
    named = list(model.named_modules())
    bns = [n for n, m in named if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns
    layers = [(n, m) for n, m in named if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    last_linear = [n for n, m in layers if isinstance(m, nn.Linear)][-1:]
    return [n for n, _ in layers if n not in last_linear]


# Modules whose backward does not read their own output, so Eq. 6 may update that output in place.
_OUTPUT_NOT_SAVED = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)


@dataclass(eq=False)
class _State:
    handle: Handle
    signs: torch.Tensor | None = None  # int8 sign(dJ/da) of the previous batch, r_l in Eq. 5
    scale: torch.Tensor | None = None  # 0-dim eps_l
    sink: torch.Tensor | None = None  # stride-0 zero leaf added to the output; receives dJ/da


class _Point(nn.Module):
    """Mixin placed in front of a point's own class: its forward, then Eq. 6."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        state = self._lwat
        handle = state.handle
        if not (self.training or handle.in_eval):
            return out
        signs, n = state.signs, out.shape[0]
        usable = signs is not None and signs.shape[1:] == out.shape[1:] and n <= signs.shape[0]
        if handle.perturb and usable:
            rows = signs if n == signs.shape[0] else signs[:n]
            if isinstance(self, _OUTPUT_NOT_SAVED):  # no allocation: the module's backward never reads its output
                out = out.addcmul_(rows, state.scale)  # Eq. 6
            else:
                out = torch.addcmul(out, rows, state.scale)
        if handle.capture and out.requires_grad and not (usable and n < signs.shape[0]):
            # Eq. 5 happens in backward. Smaller batches never refresh the cache.
            if _compile.is_compiling():  # a hook would break the graph: a sink leaf receives dJ/da
                out = _compile.add_sink(state, out, handle.split_codes,
                                        functools.partial(_cache_gradient, state, _layout(out)))
            else:  # eager: a hook on the activation costs no extra pass (a sink costs an add and a copy)
                out.register_hook(functools.partial(_cache_gradient, state, _layout(out)))
        return out


@functools.cache
def _point_class(cls: type) -> type:
    # One subclass per module class, reused, so compiled graphs are shared between instances.
    return type(f"Perturbed{cls.__name__}", (_Point, cls), {"__module__": cls.__module__})


def _layout(out: torch.Tensor) -> torch.memory_format:
    channels_last = out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not out.is_contiguous() else torch.contiguous_format


@torch.no_grad()
def _cache_gradient(state: _State, layout: torch.memory_format, g: torch.Tensor) -> None:
    # Eq. 5, run by autograd during backward with g = dJ/da at this point.
    handle = state.handle
    lo, hi = torch.aminmax(g)
    spread = hi.float() - lo.float()  # fp32: an fp16 range can overflow
    if handle.direction == "random":
        signs = torch.empty_like(g, dtype=torch.int8).random_(0, 2).mul_(2).sub_(1)
    else:  # int8 sign(g) without an fp32 temporary (faster than sign().to(int8) on CPU)
        signs = g.gt(0).to(torch.int8) - g.lt(0).to(torch.int8)
    signs = signs.contiguous(memory_format=layout)
    if handle.scale == "range":
        scale = spread.float().mul_(handle.eps)  # eps_l = eps * (M - m), appendix
        if handle.grad_scale is not None:  # a GradScaler's loss scale: eps_l uses the true gradient
            scale = scale.div_(handle.grad_scale)
    else:
        scale = torch.full((), handle.eps, device=g.device)
    if handle.grad_scale is not None:
        # Under a GradScaler an fp16 step may overflow: inf/NaN gradients, a step the scaler skips. That gradient
        # must not poison the cache: where M - m is not finite, keep the previous signs and eps_l (with none of
        # this shape to keep, eps_l = 0: the next pass is unperturbed). torch.where, so no host sync; it costs
        # one pass over the int8 signs, paid only with a scaler.
        finite = torch.isfinite(spread)
        old = state.signs
        if old is not None and old.shape == signs.shape and old.device == signs.device:
            signs = torch.where(finite, signs, old)
            scale = torch.where(finite, scale, state.scale)
        else:
            scale = torch.where(finite, scale, torch.zeros_like(scale))
    state.signs, state.scale = signs, scale


class Handle:
    """What `attach` returns: the points, their cache, and the switches of the method."""

    def __init__(self, model, named_modules, eps, scale, direction):
        self.eps, self.scale, self.direction = eps, scale, direction
        self.points = [n for n, _ in named_modules]
        self.grad_scale = None  # a GradScaler's scale tensor: the cache then uses unscaled gradients
        self.perturb = True  # add eps_l * r_l in this pass
        self.capture = True  # refresh the cache from this pass's gradient
        self.in_eval = False  # also act in eval mode (test-time attack, paper Section 3.3)
        self._modules = dict(named_modules)
        for module in self._modules.values():
            module._lwat = _State(self)
            module.__class__ = _point_class(type(module))
        self.split_codes = set()  # compiled code the first compiled step split, dropped once (lwat/_compile.py)

    def detach(self) -> None:
        """Remove every point: the model is exactly the plain model again."""
        for module in self._modules.values():
            module.__class__ = type(module).__bases__[1]
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
            module._lwat.signs = module._lwat.scale = None

    def state_dict(self) -> dict:
        """The cache, for checkpoints: {point name: {"signs": int8 tensor, "scale": 0-dim tensor}}."""
        return {n: {"signs": m._lwat.signs, "scale": m._lwat.scale} for n, m in self._modules.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a cache saved by `state_dict()`; the next train pass is perturbed with it."""
        if set(state) != set(self._modules):
            raise ValueError(f"cache has points {sorted(state)}, the model has {sorted(self._modules)}")
        for name, module in self._modules.items():
            module._lwat.signs, module._lwat.scale = state[name]["signs"], state[name]["scale"]
