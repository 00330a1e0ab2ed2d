"""attach(kernels="fused"): in eager mode, a BatchNorm point's forward with Eq. 6 as one torch.compile'd function,
its backward with Eq. 5 as another. Imported by lwat/perturb.py only when kernels="fused".

Eager, Eq. 6 cannot be fused into the kernel that makes the activation, so it reads and writes the activation once
more. At a train-mode BatchNorm, these kernels make the activation themselves: the forward is the per-channel
statistics, then normalization, affine and perturbation in one pass; the backward is the per-channel sums with g's
min and max, then the input gradient with the signs. They compute what torch's BatchNorm computes (the batch's
mean and biased variance normalize; the unbiased variance updates running_var), in fp32 for fp16 and bf16 inputs,
rounded differently: equal to the aten path within float rounding, not bit for bit. Each activation shape gets
its own copy of the functions' code, so dynamo compiles each with static sizes and the shapes of a net do not
count against its recompile limit of one code object. Figures: benchmarks/README.md.

Torch APIs used: torch.compile (needs a C++ compiler on the CPU) and, privately, torch._dynamo.exc.
BackendCompilerFailed and its inner_exception (a compile error becomes one KernelsError line). Tested on torch 2.13.0+cpu.
"""

from __future__ import annotations

import functools
import types

import torch

from lwat import cache, perturb


class KernelsError(RuntimeError):
    """attach(kernels="fused") cannot compile its kernels on this machine (no C++ compiler, ...)."""


def fusable(bn, state, args, kwargs) -> bool:
    """Whether this pass of a BatchNorm point runs as the kernels: a train-mode BatchNorm with what they assume
    (affine, running statistics, a momentum), one floating input, an eager pass that perturbs or captures gradient
    signs, and a gradient to capture. Any other pass runs perturb.py's point code."""
    x = args[0] if len(args) == 1 and not kwargs else None
    handle = state.handle
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2 and x.numel() > x.shape[1]
            and bn.training and bn.affine and bn.track_running_stats and bn.momentum is not None
            and handle.direction == "gradient" and handle._sizing is None and not torch.compiler.is_compiling()
            and torch.is_grad_enabled() and (x.requires_grad or bn.weight.requires_grad)
            and (handle.perturb or handle.capture)
            and (handle.capture or cache.fits(state.signs, x.shape, x.device)))


def batch_norm(bn, state, x: torch.Tensor) -> torch.Tensor:
    """The eager point's rules (perturb._Point), with the BatchNorm and Eq. 6 in one compiled forward."""
    bn._check_input_dim(x)
    if not cache.fits(state.signs, x.shape, x.device):  # a new cache, eps_l 0: this pass adds nothing
        cache.fit(state, x, x.device, cache.layout_of(x))
    n, handle = x.shape[0], state.handle
    full = n == state.signs.shape[0]
    # Detached: not a view (the first cache is one), so the kernel does not guard on a view's base.
    signs = (state.signs if full else state.signs[:n]).detach() if handle.perturb else None
    bn.num_batches_tracked.add_(1)  # as torch's BatchNorm counts its train-mode passes
    return _BatchNormEq56.apply(x, bn.weight, bn.bias, bn, signs, state.scale,
                                state if handle.capture and full else None)  # smaller batches never capture


class _BatchNormEq56(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn, signs, scale, state):
        # The running statistics updated through .data, as torch's BatchNorm updates them: unversioned, so a
        # backward of another pass that saved them (a joint loss's clean pass) still runs.
        kernels = _kernels(tuple(x.shape[1:]))
        y, mean, invstd = _run(kernels[0], x, weight, bias, bn.running_mean.data, bn.running_var.data, signs,
                               scale, bn.momentum, bn.eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.state = state
        ctx.made, ctx.scale_kind = (None, None) if state is None else (state.made, state.handle.scale)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, mean, invstd = ctx.saved_tensors
        cache = None if ctx.state is None else perturb._eager_cache(ctx.state, ctx.made)
        grad_x, grad_weight, grad_bias, new_signs, lo, hi = _run(_kernels(tuple(x.shape[1:]))[1], g, x, weight,
                                                                 mean, invstd, cache is not None)
        if cache is not None:
            new_signs = perturb._eq5_scale(new_signs, lo, hi, *cache, ctx.scale_kind)
            state = ctx.state
            if new_signs.is_contiguous(memory_format=state.layout):  # kept as the cache: no copy
                state.signs = new_signs
                state.flat = (new_signs.permute(0, 2, 3, 1) if state.layout == torch.channels_last
                              else new_signs).reshape(-1)
            else:
                state.signs.copy_(new_signs)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _bn_forward(x, weight, bias, running_mean, running_var, signs, scale, momentum: float, eps: float):
    acc = torch.promote_types(x.dtype, torch.float32)
    dims, channel = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
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
    dims, channel = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    xhat = (x.to(acc) - mean.view(channel)) * invstd.view(channel)
    g32 = g.to(acc)
    grad_bias, grad_weight = g32.sum(dims), (g32 * xhat).sum(dims)
    grad_x = (invstd * weight).view(channel) * (g32 - (grad_bias / n).view(channel)
                                                - xhat * (grad_weight / n).view(channel))
    grads = grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    if not capture:
        return *grads, None, None, None
    # Eq. 5: per channel first, so the range joins the sums' loop (one pass over g); min and max are exact. The
    # sign through int32, which inductor's CPU code converts to int8 faster than fp32 (benchmarks/README.md).
    return *grads, torch.sign(g).to(torch.int32).to(torch.int8), g.amin(dims).amin(), g.amax(dims).amax()


@functools.cache
def _kernels(shape: tuple[int, ...]) -> tuple:
    # Each activation shape (batch size aside) gets code objects of its own: static sizes, no shared recompile
    # count; a second batch size compiles one graph more, dynamic in the batch size only.
    def copy(f):
        return types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__)
    return torch.compile(copy(_bn_forward)), torch.compile(copy(_bn_backward))


def _run(kernel, *args):
    # A kernel unrecorded, autocast off; a compile error becomes one KernelsError line.
    try:
        with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            return kernel(*args)
    except Exception as e:
        from torch._dynamo.exc import BackendCompilerFailed  # loaded by torch.compile already
        if not isinstance(e, BackendCompilerFailed):
            raise
        inner = e.inner_exception
        why = (str(inner).strip().splitlines() or [""])[0]
        raise KernelsError(f"kernels='fused' cannot compile its kernels here ({type(inner).__name__}: {why}); "
                           "use kernels='aten', the default") from e
