"""Input-space L-infinity attacks (FGSM, PGD) as small uniform calls: `attack(model, images, labels, eps) -> adv`.

torchattacks style: images are float (N, C, H, W) in [0, 1], eps is in pixel units (8/255 is eight grey
levels) because every lwat model normalizes its input itself. Inside an attack the model is in eval mode;
the train/eval flag of every submodule is restored afterwards, also when the attack raises. Gradients are
taken with `torch.autograd.grad` with respect to the images only, so no `.grad` is ever written on the
model's parameters.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode inside the block; after it, every submodule's own train/eval flag is restored (a model
    may mix train and eval parts), also when the block raises. Yields the model."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _check(images: torch.Tensor, labels: torch.Tensor, eps: float) -> None:
    if not torch.is_floating_point(images) or images.ndim < 2:
        raise TypeError(f"images must be a float (N, C, H, W) tensor in [0, 1], got {images.dtype} "
                        f"{tuple(images.shape)}; divide uint8 images by 255 first")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    check_eps(eps)


def check_eps(eps) -> None:
    """ValueError unless `eps` is a real number >= 0 (Python or numpy; not a bool): an attack radius in pixel units."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:  # numpy numbers too
        raise ValueError(f"eps must be a number >= 0 (pixel units), got {eps!r}")


def input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), labels) / dx, the loss a mean over the batch, in the model's current mode; no parameter's .grad
    is written.

    Args:
        model: classifier taking (N, C, H, W) images and returning (N, classes) logits.
        x: float (N, C, H, W) images.
        labels: int64 (N,) labels.

    Returns:
        float (N, C, H, W), detached.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015): x + eps * sign(grad_x CE), in [0, 1].

    Args:
        model: classifier taking (N, C, H, W) images in [0, 1] and returning (N, classes) logits.
        images: float (N, C, H, W) in [0, 1].
        labels: int64 (N,) true labels.
        eps: L-infinity radius in pixel units.

    Returns:
        Adversarial images, float (N, C, H, W) in [0, 1], detached.
    """
    _check(images, labels, eps)
    with eval_mode(model):
        grad = input_gradient(model, images, labels)
    return fgsm_step(images.detach(), grad.sign(), eps)


def fgsm_step(images: torch.Tensor, sign: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM's image for a given gradient sign: images + eps * sign, clipped to [0, 1] (a valid image).

    Args:
        images: float (N, C, H, W) in [0, 1].
        sign: the sign of the input gradient, same shape (`input_gradient(...).sign()`).
        eps: pixel units.

    Returns:
        A new float (N, C, H, W) tensor in [0, 1].
    """
    return (images + eps * sign).clamp_(0, 1)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 10,
        step_size: float | None = None, random_start: bool = True,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent, L-infinity (Madry et al., ICLR 2018).

    Starts from x (or x + uniform noise in [-eps, eps]), then `steps` times: x' + step_size * sign(grad),
    projected onto the eps-ball around x and clipped to [0, 1].

    Args:
        model: classifier taking (N, C, H, W) images in [0, 1] and returning (N, classes) logits.
        images: float (N, C, H, W) in [0, 1].
        labels: int64 (N,) true labels.
        eps: L-infinity radius in pixel units.
        steps: gradient steps.
        step_size: pixel units per step; default 2.5 * eps / steps (Madry et al.'s rule of thumb).
        random_start: start from a uniform random point of the eps-ball.
        generator: seeds the random start (its device may differ from the images').

    Returns:
        Adversarial images, float (N, C, H, W) in [0, 1], within eps of `images`, detached.
    """
    _check(images, labels, eps)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    x0 = images.detach()
    lo, hi = (x0 - eps).clamp_(min=0), (x0 + eps).clamp_(max=1)  # the eps-ball intersected with [0, 1]
    x = x0.clone()
    if random_start and eps > 0:
        device = generator.device if generator is not None else x0.device
        noise = torch.rand(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x = torch.minimum(torch.maximum(x + (2 * noise - 1) * eps, lo), hi)
    with eval_mode(model):
        for _ in range(steps):
            grad = input_gradient(model, x, labels)
            x = torch.minimum(torch.maximum(x + step_size * grad.sign(), lo), hi)
    return x


# Every attack: attack(model, images, labels, eps, **options) -> adversarial images.
ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}


def get_attack(name: str) -> Callable[..., torch.Tensor]:
    """The attack registered under `name` (a key of ATTACKS); an unknown name is a ValueError."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]
