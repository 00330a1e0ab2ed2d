"""Hand-written references for the tests: the paper's test-time perturbations written out plainly on a plain model
(forward hooks and torch.autograd.grad), independent of lwat.attach and lwat.evaluate. Each returns predictions."""

import torch
import torch.nn.functional as F
from torch import nn


def resnet20_layout(block, width: int, relu=nn.ReLU) -> nn.Sequential:
    """ResNet-20's layout (3 stages of 3 `block(c_in, c, stride)`, strides 1, 2, 2) around a stem and a head: one
    block class, reused with different strides and shortcuts, as a user's torchvision-style model."""
    blocks, c_in = [], width
    for stage, c in enumerate((width, 2 * width, 4 * width)):
        for i in range(3):
            blocks.append(block(c_in, c, 2 if stage and not i else 1))
            c_in = c
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), relu(),
                         *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def fraction(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of predictions `pred` against labels `y`."""
    return (pred.cpu() == y.cpu()).sum().item() / len(y)


def clean_predictions(model, x):
    with torch.no_grad():
        return model(x.float() / 255).argmax(1)


def fgsm_predictions(model, x, y, eps, batch_size, source=None):
    """Classify clip(x + eps * sign(grad_x CE), 0, 1) with `model`, the gradient taken on `source` (default the model),
    batch by batch."""
    source = model if source is None else source
    preds = []
    for i in range(0, len(x), batch_size):
        xb, yb = (x[i:i + batch_size].float() / 255).requires_grad_(True), y[i:i + batch_size]
        (g,) = torch.autograd.grad(F.cross_entropy(source(xb), yb), xb)
        with torch.no_grad():
            preds.append(model((xb + eps * g.sign()).clamp(0, 1)).argmax(1))
    return torch.cat(preds)


def previous_batch_predictions(model, x, y, eps, points, batch_size, input_only=False):
    """Section 3.3 by hand: forward hooks add eps * sign(dJ/da of the previous batch) at each point (or at the input,
    clipped to [0, 1]); gradients by torch.autograd.grad w.r.t. the activations. A smaller last batch uses the first
    rows and keeps the cache."""
    modules = dict(model.named_modules())
    signs, acts = {}, {}

    def hook(name):
        def f(module, args, out):
            if name in signs:
                out = out + eps * signs[name][:len(out)]
            acts[name] = out
            return out
        return f

    handles = [modules[n].register_forward_hook(hook(n)) for n in ([] if input_only else points)]
    preds, prev_n = [], None
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].float() / 255, y[i:i + batch_size]
            if input_only and "input" in signs:
                xb = (xb + eps * signs["input"][:len(xb)]).clamp(0, 1)
            xb.requires_grad_(True)
            logits = model(xb)
            preds.append(logits.argmax(1))
            names = ["input"] if input_only else points
            tensors = [xb] if input_only else [acts[n] for n in points]
            grads = torch.autograd.grad(F.cross_entropy(logits, yb), tensors)
            if prev_n is None or len(xb) >= prev_n:
                signs = {n: g.sign() for n, g in zip(names, grads)}
                prev_n = len(xb)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(preds)


def random_input_predictions(model, x, eps, batch_size, seed):
    """Random signs at the input by hand: the first batch clean; after each batch (but a smaller last one) new signs
    randint(0, 2) * 2 - 1 of its shape from the global generator seeded with `seed`, on the model's device; a batch
    is x + eps * signs (first rows), clipped to [0, 1]."""
    device = next(model.parameters()).device
    preds, signs = [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device).float() / 255
            usable = signs is not None and len(xb) <= len(signs)
            if usable:
                xb = (xb + eps * signs[:len(xb)]).clamp(0, 1)
            with torch.no_grad():
                preds.append(model(xb).argmax(1))
            if not (usable and len(xb) < len(signs)):
                signs = torch.randint(0, 2, xb.shape, device=device) * 2 - 1
    return torch.cat(preds)
