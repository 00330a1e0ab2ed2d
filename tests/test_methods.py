"""Tests of lwat.methods: every method trains; fgsm and fgsm-inter equal hand-written joint losses (Eq. 3)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwat
from lwat.config import TrainConfig
from lwat.methods import METHODS, get_method
from lwat.train import build


def small_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def data(device, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g).to(device), torch.randint(0, 4, (n,), generator=g).to(device)


def run_step(name, model, x, y, cfg):
    method = get_method(name)
    handle = lwat.attach(model, cfg.eps, scale=cfg.scale, direction=method.direction) if method.layerwise else None
    for p in model.parameters():
        p.grad = None
    loss, logits = method.step(model, handle, x, y, cfg)
    return loss, logits, handle


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_with_finite_loss(name, device):
    torch.manual_seed(0)
    cfg = TrainConfig(model="resnet20", method=name, dataset="synthetic", width=0.5, eps=10.0)
    model, handle = build(cfg, 4, (3, 8, 8))
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method = get_method(name)
    for seed in range(3):
        x, y = data(device, seed=seed)
        opt.zero_grad(set_to_none=True)
        loss, logits = method.step(model, handle, x, y, cfg)
        assert torch.isfinite(loss) and logits.shape == (16, 4)
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    assert (handle is not None) == get_method(name).layerwise
    if handle is not None:  # the control method's signs are random, the others' the gradient's
        assert handle.direction == ("random" if name == "random" else "gradient")
    if method.layerwise:  # the perturbation points are there and their cache is filled
        assert len(handle.points) == 19
        assert all(v["signs"].abs().sum() > 0 for v in handle.state_dict().values())
    else:
        assert handle is None and not any(hasattr(m, "_lwat") for m in model.modules())


def test_lat_perturbs_and_baseline_does_not(device):
    torch.manual_seed(0)
    net = small_net().to(device)
    cfg = TrainConfig(eps=10.0)
    outs = {}
    for name in ("baseline", "lat"):
        model = copy.deepcopy(net)
        method = get_method(name)
        handle = lwat.attach(model, cfg.eps) if method.layerwise else None
        for seed in range(2):  # the second batch is the first one lat perturbs
            x, y = data(device, seed=seed)
            outs[name] = method.step(model, handle, x, y, cfg)[1]
    plain = copy.deepcopy(net)
    plain(data(device, seed=0)[0])  # same BN statistics updates as the two methods' first step
    torch.testing.assert_close(outs["baseline"], plain(data(device, seed=1)[0]))
    assert not torch.allclose(outs["lat"], outs["baseline"], atol=1e-3)


def test_fgsm_is_eq3(device):
    """FGS-orig: alpha J(x) + (1 - alpha) J(clip(x + eps sign(grad_x J(x)))), by hand."""
    torch.manual_seed(0)
    net = small_net().to(device)
    x, y = data(device)
    cfg = TrainConfig(method="fgsm", alpha=0.3, input_eps=0.05)
    model = copy.deepcopy(net)
    loss, _, _ = run_step("fgsm", model, x, y, cfg)

    ref = copy.deepcopy(net)
    params = list(ref.parameters())
    xr = x.clone().requires_grad_()
    clean = F.cross_entropy(ref(xr), y)
    gx, *g_clean = torch.autograd.grad(clean, [xr] + params)
    x_adv = torch.clamp(x + 0.05 * torch.sign(gx), 0.0, 1.0)
    adv = F.cross_entropy(ref(x_adv), y)
    g_adv = torch.autograd.grad(adv, params)
    torch.testing.assert_close(loss, (0.3 * clean + 0.7 * adv).detach())
    for p, gc, ga in zip(model.parameters(), g_clean, g_adv):
        torch.testing.assert_close(p.grad, 0.3 * gc + 0.7 * ga, rtol=1e-4, atol=1e-6)


def test_fgsm_inter_and_lat_joint_by_hand(device):
    """FGS-inter perturbs every point with eps_l * sign of the current batch's clean gradient there;
    lat-joint's clean pass is unperturbed and leaves the cache alone."""
    torch.manual_seed(0)
    net = small_net().to(device)
    x, y = data(device)
    cfg = TrainConfig(method="fgsm-inter", alpha=0.5, eps=10.0)
    model = copy.deepcopy(net)
    loss, logits, handle = run_step("fgsm-inter", model, x, y, cfg)

    ref = copy.deepcopy(net)
    params = list(ref.parameters())
    acts, delta = {}, {}

    def hook(i):
        def fn(module, args, out):
            if i in delta:
                out = out + delta[i]
            out.retain_grad()
            acts[i] = out
            return out
        return fn

    for i in (1, 4):
        ref[i].register_forward_hook(hook(i))
    clean = F.cross_entropy(ref(x), y)
    g_clean = torch.autograd.grad(clean, params + [acts[1], acts[4]])
    for i, g in zip((1, 4), g_clean[-2:]):
        delta[i] = 10.0 * (g.max() - g.min()) * torch.sign(g)
    adv_logits = ref(x)
    g_adv = torch.autograd.grad(F.cross_entropy(adv_logits, y), params)
    torch.testing.assert_close(logits, adv_logits.detach(), rtol=1e-4, atol=1e-5)
    for p, gc, ga in zip(model.parameters(), g_clean, g_adv):
        torch.testing.assert_close(p.grad, 0.5 * gc + 0.5 * ga, rtol=1e-4, atol=1e-6)
    # The cache is captured once per step, by the clean pass: it holds the clean gradient's signs, not the
    # perturbed pass's (which would be a second capture, of no use: the next step's clean pass replaces it).
    for i, g in zip((1, 4), g_clean[-2:]):
        assert torch.equal(handle.state_dict()[str(i)]["signs"], torch.sign(g).to(torch.int8)), i
    assert handle.capture  # restored after the step

    # lat-joint: on a fresh handle the first step's perturbed pass is unperturbed (nothing cached), so
    # both passes give the plain logits; the cache afterwards comes from the perturbed pass only.
    model = copy.deepcopy(net)
    cfg = cfg.replace(method="lat-joint")
    loss, logits, handle = run_step("lat-joint", model, x, y, cfg)
    plain = copy.deepcopy(net)
    plain(x)
    torch.testing.assert_close(logits, plain(x))
    cache = {p: v["signs"].clone() for p, v in handle.state_dict().items()}
    x2, y2 = data(device, seed=1)
    method = get_method("lat-joint")
    with handle.paused():
        clean_out = model(x2)
    assert all(torch.equal(cache[p], v["signs"]) for p, v in handle.state_dict().items())
    assert not torch.allclose(clean_out, model(x2), atol=1e-4)  # the second pass is perturbed
    assert method.passes == 2 and get_method("lat").passes == 1


@pytest.mark.parametrize("kernels", ["aten", "fused"])
def test_lat_joint_is_eq3_with_the_previous_batch_signs(kernels, device):
    """Ours-joint by hand: alpha J(x_t) + (1 - alpha) J(x_t with a_l + eps_l sign(g_l) at every point), g_l the
    gradient cached at batch t-1 of that step's joint loss: (1 - alpha) dJ/da_l, so eps_l = eps (M - m) of it.
    kernels="fused": the clean pass runs torch's BatchNorm and the perturbed one lwat's, in one graph."""
    torch.manual_seed(0)
    net = small_net().to(device)
    (x1, y1), (x2, y2) = data(device, seed=0), data(device, seed=1)
    cfg = TrainConfig(method="lat-joint", alpha=0.3, eps=10.0)
    model = copy.deepcopy(net)
    method = get_method("lat-joint")
    handle = lwat.attach(model, cfg.eps, kernels=kernels)
    method.step(model, handle, x1, y1, cfg)  # batch t-1: fills the cache
    for p in model.parameters():
        p.grad = None
    loss, logits = method.step(model, handle, x2, y2, cfg)

    ref = copy.deepcopy(net)
    params = list(ref.parameters())
    acts, delta = {}, {}

    def hook(i):
        def fn(module, args, out):
            out = out + delta[i] if i in delta else out
            acts[i] = out
            return out
        return fn

    for i in (1, 4):
        ref[i].register_forward_hook(hook(i))
    # Batch t-1: nothing cached yet, so its perturbed pass is the plain one.
    g_prev = torch.autograd.grad(F.cross_entropy(ref(x1), y1), [acts[1], acts[4]])
    perturbation = {}
    for i, g in zip((1, 4), g_prev):
        g = (1 - 0.3) * g
        perturbation[i] = 10.0 * (g.max() - g.min()) * torch.sign(g)
    clean = F.cross_entropy(ref(x2), y2)  # batch t, clean
    g_clean = torch.autograd.grad(clean, params)
    delta.update(perturbation)  # batch t, perturbed
    perturbed_logits = ref(x2)
    perturbed = F.cross_entropy(perturbed_logits, y2)
    g_perturbed = torch.autograd.grad(perturbed, params)
    torch.testing.assert_close(loss, (0.3 * clean + 0.7 * perturbed).detach())
    torch.testing.assert_close(logits, perturbed_logits.detach(), rtol=1e-4, atol=1e-5)
    for p, gc, gp in zip(model.parameters(), g_clean, g_perturbed):
        torch.testing.assert_close(p.grad, 0.3 * gc + 0.7 * gp, rtol=1e-4, atol=1e-6)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'pgd'; known: baseline"):
        get_method("pgd")
