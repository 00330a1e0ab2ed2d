"""What attached models do under training patterns beyond one forward and one backward per step (perturb.py's
docstring, "Rules worth knowing"): gradient accumulation, activation checkpointing, copies and EMA averages,
torch.func.functional_call. Each compared with a hand computation or with the same run without the pattern."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

import lwat
from test_perturb import batches, conv_bn_net, lwat_run, reference_run


def perturbation(model, x, point):
    """A point's output minus the same module's plain output, for input x (the point's input from the model)."""
    modules = dict(model.named_modules())
    seen = {}
    hook = modules[point].register_forward_hook(lambda m, args, out: seen.update(args=args, out=out.detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    plain = type(modules[point]).__bases__[1].forward(modules[point], *seen["args"])
    return seen["out"] - plain


def test_gradient_accumulation_perturbs_each_micro_batch_with_the_previous_ones_signs(device):
    """Micro-batches (forward + backward each, one optimizer step for all): micro-batch k is perturbed with the
    signs and eps_l of micro-batch k-1, exactly Algorithm 1 with no weight update between them."""
    torch.manual_seed(0)
    net = conv_bn_net().to(device)
    micro = batches(4, (4, 3, 8, 8), device=device)
    model = copy.deepcopy(net)
    handle = lwat.attach(model, 10.0)
    outs = []
    for x, y in micro:  # accumulate; no optimizer step in between
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
    ref_outs, ref_r, ref_eps = reference_run(net, handle.points, micro, 10.0, "range", lr=0.0)
    for o, ro in zip(outs, ref_outs):
        torch.testing.assert_close(o, ro, rtol=1e-5, atol=1e-5)
    for p in handle.points:
        assert torch.equal(handle.state_dict()[p]["signs"].float(), ref_r[p])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # the step boundary leaves the cache alone: the next micro-batch uses the last one's signs
    x, _ = micro[0]
    expect = ref_eps["1"] * ref_r["1"][: len(x)]
    torch.testing.assert_close(perturbation(model, x, "1"), expect, rtol=1e-5, atol=1e-6)


class Checkpointed(nn.Module):
    """conv-BN-ReLU-conv-BN run under torch.utils.checkpoint (its activations recomputed in backward)."""

    def __init__(self, c, use_reentrant):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.use_reentrant = use_reentrant

    def forward(self, x):
        if self.use_reentrant is None:
            return F.relu(x + self.body(x))
        return F.relu(x + checkpoint(self.body, x, use_reentrant=self.use_reentrant))


def checkpointed_net(use_reentrant):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), Checkpointed(6, use_reentrant),
                         Checkpointed(6, use_reentrant), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_gives_the_cache_of_a_plain_run(use_reentrant, device):
    torch.manual_seed(0)
    plain = checkpointed_net(None).to(device)
    ckpt = checkpointed_net(use_reentrant).to(device)
    ckpt.load_state_dict(plain.state_dict())
    data = batches(4, (8, 3, 8, 8), device=device)
    _, h_plain, outs_plain = lwat_run(plain, data, 10.0, "range")
    _, h_ckpt, outs_ckpt = lwat_run(ckpt, data, 10.0, "range")
    assert h_ckpt.points == h_plain.points and len(h_ckpt.points) == 5
    for a, b in zip(outs_plain, outs_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p in h_plain.points:
        assert torch.equal(h_ckpt.state_dict()[p]["signs"], h_plain.state_dict()[p]["signs"]), p
        assert torch.equal(h_ckpt.state_dict()[p]["scale"], h_plain.state_dict()[p]["scale"]), p


def test_deepcopy_is_an_independent_attached_model(device):
    torch.manual_seed(0)
    data = batches(4, (8, 3, 8, 8), device=device)
    model, handle, _ = lwat_run(conv_bn_net().to(device), data[:2], 10.0, "range")
    before = handle.state_dict()
    twin = copy.deepcopy(model)
    plain = conv_bn_net().to(device)
    plain.load_state_dict(model.state_dict())
    x, y = data[2]
    # train mode: the copy perturbs with its own copy of the cache, exactly as the original would
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert not torch.allclose(twin(x), plain(x), atol=1e-3)
    F.cross_entropy(twin(x), y).backward()  # refreshes the copy's cache only
    for p in handle.points:
        assert torch.equal(handle.state_dict()[p]["signs"], before[p]["signs"]), p
    twin_signs = dict(twin.named_modules())[handle.points[0]]._lwat.signs
    assert not torch.equal(twin_signs, before[handle.points[0]]["signs"])
    assert twin_signs.data_ptr() != dict(model.named_modules())[handle.points[0]]._lwat.signs.data_ptr()
    plain.load_state_dict(twin.state_dict())  # (the train-mode passes moved the copy's BatchNorm statistics)
    twin.eval(), plain.eval()
    torch.testing.assert_close(twin(x), plain(x), rtol=0, atol=0)  # eval: the plain model
    handle.detach()  # the original's handle does not reach the copy
    assert all(hasattr(dict(twin.named_modules())[p], "_lwat") for p in handle.points)


def test_ema_copy_averages_weights_and_never_touches_the_cache(device):
    torch.manual_seed(0)
    data = batches(5, (8, 3, 8, 8), device=device)
    model = conv_bn_net().to(device)
    handle = lwat.attach(model, 10.0)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = [copy.deepcopy(list(model.parameters()))]
    for x, y in data[:3]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ema.update_parameters(model)
        params.append(copy.deepcopy(list(model.parameters())))
    cache = handle.state_dict()
    x, _ = data[3]
    with torch.no_grad():
        ema.train()
        ema(x)  # a train-mode pass of the copy (e.g. re-estimating BatchNorm statistics)
    for p in handle.points:
        assert torch.equal(handle.state_dict()[p]["signs"], cache[p]["signs"]), p
    # the averaged weights by hand: w_1, then w <- 0.5 w + 0.5 w_t (get_ema_multi_avg_fn(0.5))
    avg = params[1]  # the first update copies the weights
    for step in params[2:]:
        avg = [0.5 * a + 0.5 * w for a, w in zip(avg, step)]
    for a, w in zip(avg, ema.module.parameters()):
        torch.testing.assert_close(w, a)
    plain = conv_bn_net().to(device)
    plain.load_state_dict(ema.module.state_dict())
    ema.eval(), plain.eval()
    torch.testing.assert_close(ema(x), plain(x), rtol=0, atol=0)


def test_functional_call_is_a_normal_call(device):
    """functional_call with other weights: perturbed with the cache, and its backward refreshes the cache, exactly
    as a normal call of the model holding those weights."""
    torch.manual_seed(0)
    data = batches(3, (8, 3, 8, 8), device=device)
    model, handle, _ = lwat_run(conv_bn_net().to(device), data[:2], 10.0, "range")
    twin = copy.deepcopy(model)
    other = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(other[n])
    x, y = data[2]
    params = {n: p.requires_grad_() for n, p in other.items()}
    out = torch.func.functional_call(model, params, (x,))
    F.cross_entropy(out, y).backward()
    expect = twin(x)
    F.cross_entropy(expect, y).backward()
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    for p in handle.points:
        mine = handle.state_dict()[p]
        theirs = dict(twin.named_modules())[p]._lwat
        assert torch.equal(mine["signs"], theirs.signs) and torch.equal(mine["scale"], theirs.scale), p


def test_update_bn_on_an_averaged_copy_gives_the_plain_models_statistics_when_paused(device):
    """Issue 33: AveragedModel of an attached model after training began copies the cache, so update_bn's
    train-mode passes are perturbed. The recipe of perturb.py's docstring, `with lwat.handle_of(swa).paused():
    update_bn(...)`, gives what the plain model's own update_bn gives: the same running statistics and eval output
    as an AveragedModel of a plain copy with the same weights; without it they differ."""
    from torch.optim.swa_utils import update_bn
    torch.manual_seed(0)
    model, handle, _ = lwat_run(conv_bn_net().to(device), batches(3, (8, 3, 8, 8), device=device), 10.0, "range")
    loader = [x for x, _ in batches(4, (8, 3, 8, 8), seed=1, device=device)]
    plain = copy.deepcopy(model)
    lwat.handle_of(plain).detach()  # the plain model on the same weights
    reference = AveragedModel(plain)
    update_bn(loader, reference)
    results = {}
    for paused in (True, False):
        swa = AveragedModel(model)
        assert lwat.handle_of(swa) is not handle and lwat.handle_of(swa.module).points == handle.points
        with lwat.handle_of(swa).paused() if paused else contextlib.nullcontext():
            update_bn(loader, swa)
        results[paused] = swa.eval()(loader[0]).detach(), swa.module[4].running_mean.clone()  # after a point
    expected = reference.eval()(loader[0]).detach(), reference.module[4].running_mean
    assert torch.equal(results[True][0], expected[0]) and torch.equal(results[True][1], expected[1])
    assert not torch.allclose(results[False][0], expected[0], atol=1e-6)  # unpaused: perturbed statistics
    assert not torch.allclose(results[False][1], expected[1], atol=1e-6)
    with pytest.raises(ValueError, match="holds 0 attached models"):
        lwat.handle_of(plain)


def test_handle_of_finds_the_handle_of_the_attached_module(device):
    model = conv_bn_net().to(device)
    handle = lwat.attach(model, 10.0)
    assert lwat.handle_of(model) is handle and lwat.handle_of(nn.Sequential(model)) is handle
    with pytest.raises(ValueError, match="holds 2 attached models"):
        lwat.handle_of(nn.Sequential(model, copy.deepcopy(model)))


def test_eps_l_is_fp32_when_the_default_dtype_is_bfloat16():
    """Issue 33 (Lightning precision="bf16-true" sets the default dtype to bfloat16): eps_l is stored in fp32,
    equal to eps * (max - min) of the point's gradient computed in fp32, not rounded to bf16."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        plain, model = copy.deepcopy(net), copy.deepcopy(net)
        handle = lwat.attach(model, 10.0)
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        F.cross_entropy(model(x), y).backward()
        seen = {}
        plain[1].register_forward_hook(lambda m, args, out: seen.update(out=out) or out.retain_grad())
        F.cross_entropy(plain(x), y).backward()  # the first pass is unperturbed: the same gradient
        g = seen["out"].grad.float()
        scale = handle.state_dict()["1"]["scale"]
        assert scale.dtype == torch.float32 and handle._loss_scale.dtype == torch.float32
        assert torch.equal(scale, 10.0 * (g.max() - g.min()))
        assert not torch.equal(scale, scale.bfloat16().float())  # a value bf16 cannot hold
    finally:
        torch.set_default_dtype(saved)
