"""Benchmark: the per-point kernels of Eq. 6 (forward add) and Eq. 5 (int8 sign + range), alternatives side by side.

Takes the perturbation points of a model at a batch size (default ResNet-20, batch 128: 19 BatchNorm outputs,
24.1M elements), makes a random fp32 activation and gradient of each point's shape, and times, over all points
together, each way of doing the two jobs the method adds to a training step. The variants take turns (one
repeat of every variant, then the next repeat, in a rotating order: benchmarks/race.py), so drift in machine
speed hits all alike; the table gives the median and minimum over repeats, in ms per step, and each variant's
ratio to the first one of its job. A reference row times one fp32 copy of all the points' elements, and the
copy bandwidth it implies.

    python benchmarks/point_kernels.py                        # ResNet-20, batch 128, 2 threads
    python benchmarks/point_kernels.py --model vgg16_bn --repeats 9
    python benchmarks/point_kernels.py --device cuda --batch-size 128 512
    python benchmarks/point_kernels.py --channels-last       # activations and gradients channels-last

Every variant's result is checked against the reference computation (torch.sign, aminmax) before timing.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import lwat
from lwat.models import build_model
from race import race


def _memory(g):
    # A dense channels-last g as one 1-D tensor in memory order (as lat reads a gradient's range), else g.
    dense_cl = g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
    return g.permute(0, 2, 3, 1).reshape(-1) if dense_cl else g


def point_shapes(model_name: str, batch: int) -> list[torch.Size]:
    """The output shape of every default perturbation point of the model at this batch size."""
    model = build_model(model_name, 10)
    modules = dict(model.named_modules())
    shapes = []
    hooks = [modules[p].register_forward_hook(lambda m, a, out: shapes.append(out.shape))
             for p in lwat.default_points(model)]
    with torch.no_grad():
        model(torch.rand(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    return shapes


# ---- Eq. 6: out += eps_l * r_l, r_l int8, eps_l a 0-dim tensor (no host sync: never .item()) -----------

def eq6_addcmul_int8(out, signs, scale):
    out.addcmul_(signs, scale)  # mixed-dtype int8 operand


def eq6_addcmul_cast(out, signs, scale):
    out.addcmul_(signs.to(out.dtype), scale)  # int8 -> fp32 temporary, then a same-dtype addcmul_


SLICE = 1 << 18  # elements per slice in the sliced variants (whole rows): the fp32 temporary (1 MiB) stays in cache


def row_slices(t, *others):
    rows = max(1, SLICE * t.shape[0] // t.numel())
    return zip(t.split(rows), *(o.split(rows) for o in others))


def eq6_sliced(out, signs, scale):
    for o, s in row_slices(out, signs):
        o.addcmul_(s.to(o.dtype), scale)


def eq6_add_mul(out, signs, scale):
    out.add_(signs * scale)  # int8 * 0-dim fp32 -> fp32 temporary, then add_


def _eq6_fused(out, signs, scale):
    out.add_(signs * scale)


# ---- Eq. 5: g -> (int8 sign(g), min(g), max(g)) -----------------------------------------------------------

def eq5_gt_lt(g, buf):
    lo, hi = torch.aminmax(g)
    return g.gt(0).to(torch.int8) - g.lt(0).to(torch.int8), lo, hi


def eq5_sign_to(g, buf):
    lo, hi = torch.aminmax(g)
    return torch.sign(g).to(torch.int8), lo, hi


def eq5_sign_into(g, buf):
    lo, hi = torch.aminmax(g)
    return buf.copy_(torch.sign(g)), lo, hi  # int8 written into last step's buffer (no fresh int8 tensor)


def eq5_flat_range(g, buf):
    lo, hi = torch.aminmax(_memory(g))  # the range over g's memory seen as 1-D (what lat does)
    return buf.copy_(torch.sign(g)), lo, hi


def eq5_sliced(g, buf):
    lo, hi = torch.aminmax(g)
    for x, b in row_slices(g, buf):
        b.copy_(torch.sign(x))
    return buf, lo, hi


def eq5_sliced_range(g, buf):
    ranges = []
    for x, b in row_slices(g, buf):
        ranges.append(torch.stack(torch.aminmax(x)))  # the slice is in cache: its range costs no memory pass
        b.copy_(torch.sign(x))
    ranges = torch.stack(ranges)
    return buf, ranges[:, 0].min(), ranges[:, 1].max()


def eq5_gt_lt_into(g, buf):
    lo, hi = torch.aminmax(g)
    torch.gt(g, 0, out=buf)  # a comparison may write int8 directly: no fp32 temporary
    return buf.sub_(g.lt(0).view(torch.int8)), lo, hi


def _eq5_fused(g):
    return torch.sign(g).to(torch.int8), g.amin(), g.amax()


def _eq5_fused_int32(g):  # the sign as kernels="fused"'s BatchNorm backward makes it (lwat/_fused.py)
    return torch.sign(g).to(torch.int32).to(torch.int8), g.amin(), g.amax()


def _eq5_fused_into(g, buf):
    buf.copy_(torch.sign(g))
    return g.amin(), g.amax()


def foreach_eq5(gs, bufs):
    """All points at once with torch._foreach_* (one multi-tensor kernel per op on CUDA; a loop on CPU)."""
    his = torch._foreach_max(gs)
    los = torch._foreach_neg(torch._foreach_max(torch._foreach_neg(gs)))
    signs = [s.to(torch.int8) for s in torch._foreach_sign(gs)]
    return signs, los, his


def run(args, device):
    shapes = point_shapes(args.model, args.batch_size)
    numel = sum(s.numel() for s in shapes)
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def on(t):
        return t.to(device, memory_format=fmt if t.dim() == 4 else torch.contiguous_format)
    outs = [on(torch.randn(s, generator=g)) for s in shapes]
    grads = [on(torch.randn(s, generator=g).relu_() * (torch.rand(s, generator=g) - 0.5))
             for s in shapes]  # about half exact zeros, as dJ/d(BN output) before a ReLU
    signs = [torch.sign(x).to(torch.int8) for x in grads]
    scale = torch.tensor(0.01, device=device)
    compiled = {} if args.no_compile else {
        "eq6_fused": torch.compile(_eq6_fused, dynamic=False),
        "eq5_fused": torch.compile(_eq5_fused, dynamic=False),
        "eq5_fused_int32": torch.compile(_eq5_fused_int32, dynamic=False),
        "eq5_fused_into": torch.compile(_eq5_fused_into, dynamic=False),
    }
    if not args.no_compile:  # static shapes: one graph per distinct point shape
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(set(shapes)) + 1)

    def eq6(fn):
        return lambda: [fn(o, s, scale) for o, s in zip(outs, signs)]

    def eq5(fn):
        return lambda: [fn(x, s) for x, s in zip(grads, signs)]

    jobs = {
        "Eq. 6": {
            "out.addcmul_(int8 signs, scale)": eq6(eq6_addcmul_int8),
            "out.addcmul_(signs.to(dtype), scale)": eq6(eq6_addcmul_cast),
            "the same in slices of 256K elements": eq6(eq6_sliced),
            "out.add_(signs * scale)": eq6(eq6_add_mul),
        },
        "Eq. 5": {
            "aminmax; gt(0).to(int8) - lt(0).to(int8)": eq5(eq5_gt_lt),
            "aminmax; sign().to(int8)": eq5(eq5_sign_to),
            "aminmax; int8 buffer.copy_(sign())": eq5(eq5_sign_into),
            "the same, aminmax of the memory as 1-D": eq5(eq5_flat_range),
            "the same in slices of 256K elements": eq5(eq5_sliced),
            "the same, range per slice too": eq5(eq5_sliced_range),
            "aminmax; gt(0, out=int8 buffer) - lt(0)": eq5(eq5_gt_lt_into),
            "torch._foreach_* over all points": lambda: foreach_eq5(grads, signs),
        },
        "reference": {"one fp32 copy of every element": lambda: [o.clone() for o in outs]},
    }
    if compiled:
        jobs["Eq. 6"]["compiled: out.add_(signs * scale), one pass"] = eq6(compiled["eq6_fused"])
        jobs["Eq. 5"]["compiled: sign -> new int8, amin, amax"] = lambda: [compiled["eq5_fused"](x) for x in grads]
        jobs["Eq. 5"]["the same, the sign through int32"] = lambda: [compiled["eq5_fused_int32"](x) for x in grads]
        jobs["Eq. 5"]["compiled: sign -> int8 buffer, amin, amax"] = eq5(compiled["eq5_fused_into"])
    check(outs, grads, signs, scale, jobs, compiled)
    flat = {(job, name): fn for job, variants in jobs.items() for name, fn in variants.items()}
    times = race(flat, args.repeats, args.warmup, lambda: sync(device))
    print(f"\n{args.model}, batch {args.batch_size}: {len(shapes)} points, {numel / 1e6:.1f}M elements"
          f"{', channels-last' if args.channels_last else ''}; {hardware(device)}, torch {torch.__version__}; "
          f"median and min of {args.repeats} alternating repeats after {args.warmup} warm-up")
    print("| job | variant | median ms | min ms | / first of job |")
    print("|---|---|---|---|---|")
    for job, variants in jobs.items():
        first = None
        for name in variants:
            med, low = 1e3 * statistics.median(times[job, name]), 1e3 * min(times[job, name])
            first = first or med
            print(f"| {job} | {name} | {med:.2f} | {low:.2f} | {med / first:.2f} |")
    copy_s = min(times["reference", "one fp32 copy of every element"])
    print(f"copy bandwidth (read + write, best repeat): {2 * 4 * numel / copy_s / 1e9:.1f} GB/s")


def check(outs, grads, signs, scale, jobs, compiled):
    """Every variant computes what the reference computes (on copies; nothing is timed here)."""
    o, s, x = outs[0].clone(), signs[0], grads[0]
    expect = o + s.float() * scale
    eq6_variants = (eq6_addcmul_int8, eq6_addcmul_cast, eq6_sliced, eq6_add_mul)
    for fn in (*eq6_variants, *([compiled["eq6_fused"]] if compiled else [])):
        got = o.clone()
        fn(got, s, scale)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    ref = (torch.sign(x).to(torch.int8), x.min(), x.max())
    for fn in (eq5_gt_lt, eq5_sign_to, eq5_sign_into, eq5_flat_range, eq5_sliced, eq5_sliced_range, eq5_gt_lt_into):
        got = fn(x, torch.empty_like(s))
        assert torch.equal(got[0], ref[0]) and got[1] == ref[1] and got[2] == ref[2], fn.__name__
    fe = foreach_eq5([x], [s])
    assert torch.equal(fe[0][0], ref[0]) and fe[1][0] == ref[1] and fe[2][0] == ref[2]
    if compiled:
        for fn in (compiled["eq5_fused"], compiled["eq5_fused_int32"]):
            got = fn(x)
            assert torch.equal(got[0], ref[0]) and got[1] == ref[1] and got[2] == ref[2]
        buf = torch.empty_like(s)
        lo, hi = compiled["eq5_fused_into"](x, buf)
        assert torch.equal(buf, ref[0]) and lo == ref[1] and hi == ref[2]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hardware(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (median, min reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first (compilation)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variants")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true", help="4-D activations and gradients channels-last")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args, torch.device(args.device))


if __name__ == "__main__":
    main()
