"""Training objectives the paper compares, in one registry: baseline, lat, lat-joint, fgsm, fgsm-inter, random.

Each method is a `step(model, handle, x, y, cfg, run) -> (loss, logits)` that runs its forward pass(es) AND
backward pass(es), so the parameters' .grad hold the gradient of its objective; the trainer then steps
the optimizer. `run` (a `Passes`, made by the trainer) says how passes run: forward passes and their losses go
inside `with run.forward():` (autocast under mixed precision), and `run.backward(loss)` replaces
`loss.backward()` (loss scaling, the perturbation cache's bookkeeping). A method never sees the precision, the
scaler or DDP. `logits` are those of the pass the method trains on (the perturbed one where there is
one: the paper's Figure 3 reports training error on the perturbed activations). Steps expect the
parameters' gradients to be zero (or None) when called. `passes` is the number
of forward+backward passes per step, the cost the paper's Table 4 column "training time" counts.

Joint methods, paper Eq. 3: J = alpha * J(clean) + (1 - alpha) * J(adversarial). For lat-joint the
cached gradient is that of this joint loss, so range-scaled eps_l is (1 - alpha) times lat's at the
same eps (signs are unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _no_context(sync: bool = True):
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Passes:
    """How a step runs its passes; `lwat.train.make_passes` makes the trainer's. The default is plain fp32.

    forward(sync=True): context manager for forward passes and their losses, never around backward (autocast
        under --amp). sync=False marks a pass whose backward is not the step's last: under DDP that backward
        skips the gradient all-reduce and the step's last backward all-reduces the sum.
    backward(loss): runs backward of `loss` (scaled by the GradScaler under --amp fp16).
    loss(logits, targets): the training loss: cross-entropy (label-smoothed under --label-smoothing), targets class
        indices or, under mixup and CutMix, class probabilities.
    """

    forward: Callable[..., contextlib.AbstractContextManager] = _no_context
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy


PLAIN = Passes()


@dataclass(frozen=True)
class Method:
    step: Callable  # (model, handle, x, y, cfg, run) -> (loss, logits); runs backward itself via run
    layerwise: bool  # lwat.attach perturbation points to the model
    passes: int  # forward+backward passes per step (training time, paper Table 4)
    direction: str = "gradient"  # of the layerwise perturbation: "gradient" or "random" (control)
    help: str = ""


def plain_step(model, handle, x, y, cfg, run=PLAIN):
    """Baseline, and lat (Algorithm 1): the attached points do the work inside the forward pass."""
    with run.forward():
        logits = model(x)
        loss = run.loss(logits, y)
    run.backward(loss)
    return loss.detach(), logits.detach()


def lat_joint_step(model, handle, x, y, cfg, run=PLAIN):
    """Ours-joint: alpha * J(clean) + (1 - alpha) * J(perturbed with the previous batch's signs)."""
    with run.forward():
        with handle.paused():  # the clean pass neither perturbs nor touches the cache
            clean = run.loss(model(x), y)
        logits = model(x)
        loss = cfg.alpha * clean + (1 - cfg.alpha) * run.loss(logits, y)
    run.backward(loss)
    return loss.detach(), logits.detach()


def fgsm_step(model, handle, x, y, cfg, run=PLAIN):
    """FGS-orig (Goodfellow et al. 2015, paper Eq. 3): x_adv = clip(x + input_eps * sign(grad_x J), 0, 1)."""
    x = x.clone().requires_grad_()
    clean = _clean_term(model, x, y, cfg, run)
    direction = x.grad.sign().nan_to_num_(0)  # NaN only where an fp16 backward overflowed: a step the scaler skips
    x_adv = (x + cfg.input_eps * direction).clamp_(0, 1).detach()
    return _adversarial_term(model, x_adv, y, cfg, run, clean)


def fgsm_inter_step(model, handle, x, y, cfg, run=PLAIN):
    """FGS-inter: the signs of the current batch's own gradients at every point, joint loss."""
    with handle.paused(capture=True):  # clean pass; its backward caches this batch's signs and eps_l
        clean = _clean_term(model, x, y, cfg, run)
    # Perturbed with those signs. Its backward must not capture again: the next step's clean pass replaces the
    # cache before anything reads it, so a second capture would be work for nothing.
    capture, handle.capture = handle.capture, False
    try:
        return _adversarial_term(model, x, y, cfg, run, clean)
    finally:
        handle.capture = capture


def _clean_term(model, x, y, cfg, run):
    # Backward of the unweighted clean loss, so the perturbation it yields does not depend on alpha;
    # then the parameter gradients (zero before the step) are weighted by alpha. Not the step's last
    # backward: under DDP the adversarial term's backward all-reduces the sum of both.
    with run.forward(sync=False):
        loss = run.loss(model(x), y)
    run.backward(loss)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(cfg.alpha)
    return cfg.alpha * loss.detach()


def _adversarial_term(model, x, y, cfg, run, clean):
    with run.forward():
        logits = model(x)
        adv = (1 - cfg.alpha) * run.loss(logits, y)
    run.backward(adv)
    return clean + adv.detach(), logits.detach()


METHODS: dict[str, Method] = {
    "baseline": Method(plain_step, layerwise=False, passes=1, help="plain training"),
    "lat": Method(plain_step, layerwise=True, passes=1, help="Ours-orig, Algorithm 1"),
    "lat-joint": Method(lat_joint_step, layerwise=True, passes=2, help="Ours-joint, alpha-weighted clean + lat"),
    "fgsm": Method(fgsm_step, layerwise=False, passes=2, help="FGS-orig, input FGSM, joint loss"),
    "fgsm-inter": Method(fgsm_inter_step, layerwise=True, passes=2,
                         help="FGS-inter, current batch's signs at every point, joint loss"),
    "random": Method(plain_step, layerwise=True, passes=1, direction="random",
                     help="control: random signs with lat's eps_l at the same points"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
