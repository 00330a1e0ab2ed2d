"""Clean, attacked and layerwise-perturbed accuracy of a trained model, and its penultimate features.

Accuracies are fractions in [0, 1]. Images are uint8 (N, C, H, W) in 0..255 or float in [0, 1]; they are
moved to the model's device one batch at a time, so a whole test set may stay on the CPU. Every function
runs the model in eval mode and restores each submodule's train/eval flag afterwards.

`layerwise_attack_accuracy` is the test-time experiment of the paper's Section 3.3 (Table 1): the test
batches are fed in order and every perturbation point of batch t is perturbed with eps * sign of the
gradient cached from batch t-1 (the same Eq. 5/6 as training, via `lwat.attach(...).evaluating()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lwat import cache
from lwat.attacks import check_eps, eval_mode, fgsm_step, get_attack, input_gradient
from lwat.perturb import DIRECTIONS, attach

FGSM_EPS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)  # the paper's FGSM eps (Tables 2 and 4), pixel units of [0, 1] images


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500,
             attack: str | Callable | None = None, eps: float = 0.0, source: nn.Module | None = None,
             **attack_kwargs) -> float:
    """Top-1 accuracy on clean or attacked images.

    Args:
        model: classifier taking images in [0, 1].
        x: uint8 (N, C, H, W) in 0..255 or float in [0, 1].
        y: int64 (N,) labels.
        batch_size: images per forward pass.
        attack: None (clean), a name in `lwat.attacks.ATTACKS` ("fgsm", "pgd"), or a callable
            attack(model, images, labels, eps, **kw) -> images.
        eps: attack radius in pixel units; 0 means clean images (the attack is not run).
        source: craft the attack on this model instead of `model` (transfer, paper Table 2).
        **attack_kwargs: passed to the attack (steps, step_size, generator, ...).

    Returns:
        Fraction of correctly classified images.
    """
    attack_fn = get_attack(attack) if isinstance(attack, str) else attack
    if attack_fn is None and eps != 0:
        raise ValueError(f"eps={eps} but no attack given; pass attack='fgsm' (or another) or eps=0")
    use_attack = attack_fn is not None and eps != 0  # a negative eps reaches the attack, which rejects it
    device = model_device(model)
    craft_on = model if source is None else source
    craft_device = model_device(craft_on)
    correct = 0
    with eval_mode(model):
        for xb, yb in batches(x, y, batch_size, device):
            if use_attack:
                xb = attack_fn(craft_on, xb.to(craft_device), yb.to(craft_device), eps, **attack_kwargs).to(device)
            with torch.no_grad():
                correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / len(y)


def robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float], *,
               attack: str = "fgsm", batch_size: int = 500, progress: bool = False) -> dict[float, float]:
    """Accuracy under one attack for each eps (paper Table 4).

    Args:
        model: classifier taking images in [0, 1].
        x, y: images (uint8 or float in [0, 1]) and labels.
        eps_list: radii in pixel units; 0 gives the clean accuracy.
        attack: a name in `lwat.attacks.ATTACKS` (PGD's random start is seeded: the result is deterministic).
        batch_size: images per forward pass.
        progress: show a tqdm bar over eps_list.

    Returns:
        {eps: accuracy} in the order of eps_list.
    """
    get_attack(attack)  # an unknown name fails before any work
    values = [float(e) for e in eps_list]
    repeated = sorted({e for e in values if values.count(e) > 1})
    if repeated:  # {eps: accuracy} has one entry per eps
        raise ValueError(f"eps {repeated[0]:g} is given more than once")
    if attack == "fgsm":
        return _fgsm_sweep(model, x, y, values, batch_size, progress)
    if progress:
        from tqdm.auto import tqdm
        values = tqdm(values, desc=f"{attack} eps", leave=False)
    # A random start drawn from a generator seeded 0 for each eps: the same run evaluates the same on every call.
    return {e: accuracy(model, x, y, batch_size=batch_size, attack=attack, eps=e,
                        generator=torch.Generator().manual_seed(0)) for e in values}


def _fgsm_sweep(model, x, y, eps_list, batch_size, progress) -> dict[float, float]:
    # FGSM's direction, sign(grad_x J), does not depend on eps: one gradient per batch serves every eps, and
    # each eps costs one forward pass: the same numbers as accuracy(attack="fgsm") for each eps, at about a third
    # of the cost for several eps.
    for e in eps_list:
        check_eps(e)
    device = model_device(model)
    correct = dict.fromkeys(eps_list, 0)
    stream = batches(x, y, batch_size, device)
    if progress:
        from tqdm.auto import tqdm
        stream = tqdm(stream, desc="fgsm", total=-(-len(y) // batch_size), leave=False)
    with eval_mode(model):
        for xb, yb in stream:
            sign = input_gradient(model, xb, yb).sign() if any(eps_list) else None
            with torch.no_grad():
                for e in eps_list:
                    xe = xb if e == 0 else fgsm_step(xb, sign, e)
                    correct[e] += (model(xe).argmax(1) == yb).sum().item()
    return {e: c / len(y) for e, c in correct.items()}


def layerwise_attack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                              batch_size: int = 100, direction: str = "gradient", points: list[str] | None = None,
                              input_only: bool = False, seed: int | None = None) -> float:
    """Accuracy under the previous-batch layerwise perturbation, a test-time attack (paper Section 3.3, Table 1).

    Test batches go through the model in order. Batch 0 is clean; batch t has eps * r at every point, r the
    signs of dJ/da cached in the backward pass of batch t-1 (itself perturbed), with the fixed scale
    eps_l = eps (so eps is in the points' activation units). A smaller last batch uses the first rows.

    Args:
        model: trained classifier taking images in [0, 1]; evaluated in eval mode, restored exactly after.
        x, y: images (uint8 or float in [0, 1]) and labels, in the order they are fed.
        eps: perturbation per point (activation units; pixel units with input_only=True).
        batch_size: test batch size (the paper's cache is one batch).
        direction: "gradient" (the attack) or "random" (control: random signs, same eps at every point).
        points: perturbation points (module names); default `lwat.default_points(model)`.
        input_only: control: perturb only the images, x_t + eps * sign(grad_x J of batch t-1), clipped to
            [0, 1]; `points` is then ignored.
        seed: seeds the random signs of direction="random" (global RNG state restored after).

    Returns:
        Fraction of correctly classified images.
    """
    out = layerwise_attack_outputs(model, x, y, eps, batch_size=batch_size, direction=direction, points=points,
                                   input_only=input_only, seed=seed)
    return (out["pred"] == y.cpu()).sum().item() / len(y)


def layerwise_attack_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                             batch_size: int = 100, direction: str = "gradient", points: list[str] | None = None,
                             input_only: bool = False, seed: int | None = None,
                             features: bool = False) -> dict[str, torch.Tensor | None]:
    """Predictions (and penultimate features) under the previous-batch layerwise perturbation.

    Same arguments as `layerwise_attack_accuracy`, plus:
        features: also return the input of the model's last nn.Linear for every image.

    Returns:
        {"pred": int64 (N,) predicted labels, "features": float (N, F) or None}, on the CPU.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    if input_only:
        check_eps(eps)  # (the points' eps is checked by attach)
    device = model_device(model)
    preds: list[torch.Tensor] = []
    with eval_mode(model), _seeded(seed, device), last_linear_inputs(model, features) as feats:
        if input_only:
            preds = _input_only_pass(model, x, y, eps, batch_size, direction, device)
        else:
            handle = attach(model, eps, scale="fixed", points=points, direction=direction)
            try:
                with handle.evaluating(), _frozen(model):
                    for xb, yb in batches(x, y, batch_size, device):
                        # Parameters are frozen and the input requires grad, so the graph still reaches every
                        # point and backward() refreshes their cache (Eq. 5) without touching any parameter
                        # .grad.
                        xb.requires_grad_(True)
                        with torch.enable_grad():
                            logits = model(xb)
                            F.cross_entropy(logits, yb).backward()
                        preds.append(logits.detach().argmax(1).cpu())
            finally:
                handle.detach()
    return {"pred": torch.cat(preds), "features": torch.cat(feats) if features else None}


def _input_only_pass(model, x, y, eps, batch_size, direction, device) -> list[torch.Tensor]:
    # Control of Section 3.3: previous-batch signs at the input layer only; same batch-size rule as perturb.py.
    preds, signs = [], None
    for xb, yb in batches(x, y, batch_size, device):
        n = len(xb)
        usable = cache.fits(signs, xb.shape, xb.device)
        if usable:
            xb = (xb + eps * signs[:n]).clamp_(0, 1)  # pixel units, kept a valid image
        xb.requires_grad_(True)
        with torch.enable_grad():
            logits = model(xb)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, yb), xb)
        if not (usable and n < len(signs)):  # a smaller last batch does not refresh the cache
            if direction == "random":
                signs = torch.randint(0, 2, xb.shape, device=device).mul_(2).sub_(1).to(xb.dtype)
            else:
                signs = grad.sign()
        preds.append(logits.detach().argmax(1).cpu())
    return preds


def penultimate_features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
    """The input of the model's last nn.Linear (the classifier's features), for t-SNE (paper Figure 1).

    Args:
        model: classifier with at least one nn.Linear; the last one in `named_modules()` order is used.
        x: uint8 (N, C, H, W) or float images in [0, 1].
        batch_size: images per forward pass.

    Returns:
        float (N, F) features on the CPU.
    """
    device = model_device(model)
    with eval_mode(model), torch.no_grad(), last_linear_inputs(model, True) as feats:
        for xb, _ in batches(x, None, batch_size, device):
            model(xb)
    return torch.cat(feats)


def last_linear(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of `model` in `named_modules()` order (the classifier); ValueError if none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer, so no penultimate features")
    return linears[-1]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def last_linear_inputs(model: nn.Module, enabled: bool = True):
    """Inside the block, every forward pass appends the input of the model's last nn.Linear (`last_linear`),
    flattened to (B, F), detached, on the CPU, to the yielded list; enabled=False yields an empty list and records
    nothing. The hook is removed after the block."""
    feats: list[torch.Tensor] = []
    if not enabled:
        yield feats
        return
    hook = last_linear(model).register_forward_pre_hook(lambda m, args: feats.append(args[0].detach().flatten(1).cpu()))
    try:
        yield feats
    finally:
        hook.remove()


@contextlib.contextmanager
def _frozen(model: nn.Module):
    # requires_grad False on every parameter inside; each flag restored after.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    # Seeds the global RNG (perturb.py draws random signs from it) and restores its state after.
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yields (float images in [0, 1], int64 labels or None) on `device`, `batch_size` at a time, in order.

    Args:
        x: uint8 (N, C, H, W) in 0..255 (divided by 255) or float in [0, 1] (copied).
        y: (N,) labels, or None.
        batch_size: images per batch (the last may be smaller).
        device: where each batch goes.

    Raises:
        ValueError: labels of another length, batch_size < 1, no images, float images outside [0, 1].
        TypeError: images neither uint8 nor float.
    """
    if y is not None and len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("no images to evaluate")
    if x.dtype == torch.uint8:
        convert = lambda b: b.to(device).float().div_(255)  # noqa: E731
    elif torch.is_floating_point(x):
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise ValueError("float images must be in [0, 1]; pass uint8 images or divide by 255")
        convert = lambda b: b.to(device, torch.float32, copy=True)  # noqa: E731
    else:
        raise TypeError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    for i in range(0, len(x), batch_size):
        yb = None if y is None else y[i:i + batch_size].to(device, torch.int64)
        yield convert(x[i:i + batch_size]), yb
