"""Benchmark: would eager lat be cheaper with torch.compile'd per-point kernels? Whole training steps, side by side.

benchmarks/point_kernels.py times each job alone, where a compiled kernel (one pass) beats the aten kernels lat
uses in eager mode. This script asks whether that survives in a training step, where a compiled kernel also
pays dynamo's guards and call per point. Seven models with the same weights take turns, step for step, in one
process, in a rotating order (benchmarks/race.py; forward, backward; no optimizer):

    baseline         the plain model
    baseline again   a second copy of it: its ratio to the first is this run's noise (A/A)
    lat              lwat.attach (the library), kernels="aten" (the default)
    lat, compiled    lwat.attach(..., kernels="compiled"): the library with its own compiled kernels
    lat, fused       lwat.attach(..., kernels="fused"): each BatchNorm point as lwat's compiled BatchNorm kernels
    BatchNorm compiled, no lat   the plain model with each BatchNorm run as those kernels, nothing perturbed or
                     captured: how much of "lat, fused" is the compiled BatchNorm's own speed
    hooks: aten      a minimal Algorithm 1 made of hooks at the same points, with lwat's eager kernels
                     (Eq. 6: addcmul_ of the signs cast to fp32; Eq. 5: aminmax, then sign copied into int8)
    hooks: compiled  the same hooks calling lwat's two torch.compile'd kernels (lwat/_compile.py: Eq. 6 one
                     pass; Eq. 5 one pass)
    hooks: compiled, no_grad   the same, with Eq. 6 called under torch.no_grad()

Why the last row: called with autograd recording, a compiled function that updates a tensor which requires grad
in place is run as a compiled autograd.Function (AOTAutograd): it returns the new value, copies it back into the
activation and adds a compiled backward node, extra passes per point that the aten addcmul_ does not make.
Eq. 6's derivative with respect to the activation is 1, so running it unrecorded (no_grad) leaves every gradient
as it was.

The hook versions skip lwat's bookkeeping (batch-size rules, GradScaler, torch.compile support), so they are
the cheapest that either kernel choice can be; "hooks: aten" against "lat" is that bookkeeping's cost.

    python benchmarks/eager_kernels.py --model resnet20 --steps 30 --threads 2 [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics

import torch
import torch.nn.functional as F

import lwat
from lwat import _compile
from lwat.models import build_model
from lwat.perturb import _BatchNormEq56, _flat, _layout, _unflatten
from race import race


def aten_eq6(out, signs, scale):
    out.addcmul_(signs.to(out.dtype), scale)


def aten_eq5(g, signs, scale, eps):
    lo, hi = torch.aminmax(g)
    signs.copy_(torch.sign(g))
    scale.copy_((hi - lo) * eps)
    return signs, scale


def compiled_eq6(out, signs, scale):
    # lwat's kernel, without its no_grad wrapper, on the tensors' memory (signs are in out's layout)
    _compile._eq6_kernel(_flat(out, _layout(out)), _flat(signs, _layout(out)), scale)


def compiled_eq5(g, signs, scale, eps):
    flat, lo, hi = _compile.eq5(_flat(g, _layout(g)))  # lwat's kernel: new int8 signs, as lat keeps them
    return _unflatten(flat, g.shape, _layout(g)), (hi - lo) * eps


def hooked(model, eps, eq6, eq5, recorded=True):
    """`model` with Algorithm 1 as forward hooks on its BatchNorms (fixed batch shape, range scaling); Eq. 6 runs
    with autograd recording it (as lat's eager Eq. 6 does) or, `recorded=False`, under torch.no_grad()."""
    def hook(module, args, out):
        if not module.training:
            return out
        if not hasattr(module, "signs"):
            module.signs = torch.zeros_like(out, dtype=torch.int8)  # in out's layout
            module.scale = torch.zeros(())
        with torch.set_grad_enabled(recorded and torch.is_grad_enabled()):
            eq6(out, module.signs, module.scale)
        def capture(g):
            module.signs, module.scale = eq5(g, module.signs, module.scale, eps)
        out.register_hook(capture)
        return out
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(hook)
    return model


def compiled_batch_norm(model):
    """`model` with each BatchNorm's train-mode forward and backward as lwat's fused BatchNorm with no signs given
    and no cache to capture into: the compiled BatchNorm kernels alone (its running-batch count is not kept:
    timing only)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            plain = m.forward
            m.forward = lambda x, m=m, plain=plain: (_BatchNormEq56.apply(x, m.weight, m.bias, m, None, None, None)
                                                     if m.training else plain(x))
    return model


def contenders(base, eps, compiled=True):
    """The nine models of the race (four without the compiled kernels), copies of `base`."""
    models = {"baseline": base, "baseline again": copy.deepcopy(base), "lat": copy.deepcopy(base),
              "hooks: aten": hooked(copy.deepcopy(base), eps, aten_eq6, aten_eq5)}
    lwat.attach(models["lat"], eps)
    if compiled:
        models["lat, compiled"] = copy.deepcopy(base)
        lwat.attach(models["lat, compiled"], eps, kernels="compiled")
        models["lat, fused"] = copy.deepcopy(base)
        lwat.attach(models["lat, fused"], eps, kernels="fused")
        models["BatchNorm compiled, no lat"] = compiled_batch_norm(copy.deepcopy(base))
        models["hooks: compiled"] = hooked(copy.deepcopy(base), eps, compiled_eq6, compiled_eq5)
        models["hooks: compiled, no_grad"] = hooked(copy.deepcopy(base), eps, compiled_eq6, compiled_eq5, False)
    return models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model (median and fastest reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="model and input channels-last")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    models = contenders(build_model(args.model, 10).to(memory_format=layout), eps=10.0)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch_size,))

    def step(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    times = race({name: functools.partial(step, model) for name, model in models.items()}, args.steps, args.warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    print(f"\n{args.model}, batch {args.batch_size}{', channels-last' if args.channels_last else ''}, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.steps} alternating steps (rotating order) after {args.warmup} warm-up\n")
    print("| model | median ms | fastest ms | / baseline (median) | / baseline (fastest) |\n|---|---|---|---|---|")
    for name in models:
        print(f"| {name} | {1e3 * med[name]:.1f} | {1e3 * best[name]:.1f} | {med[name] / med['baseline']:.3f} | "
              f"{best[name] / best['baseline']:.3f} |")


if __name__ == "__main__":
    main()
