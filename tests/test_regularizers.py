"""The cheap regularizers lwat's loop combines with any method (label smoothing, mixup, CutMix, cutout, EMA, SAM),
each checked against a computation written out here by hand from its paper, not against lwat's own code."""

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwat
from lwat.config import TrainConfig
from lwat.data import DataError, Loader, synthetic_dataset
from lwat.methods import get_method
from lwat.rundir import CHECKPOINT, load_run
from lwat.train import make_ema, make_optimizer, make_passes, sam_step, train


def data(n=64, size=8):
    return synthetic_dataset(n_train=n, n_test=16, size=size, channels=3)


def batches(crop=True, **options):
    ds = data()
    return list(Loader(ds.train_x, ds.train_y, 16, train=True, crop=crop, flip=True, seed=3, num_classes=10,
                       **options).iter_from(1))


def test_label_smoothing_loss_is_the_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    got = make_passes(nn.Identity(), label_smoothing=0.1).loss(logits, y)
    logp = logits.log_softmax(1)
    # (1 - ls) * -log p_y + ls * mean_k(-log p_k) (Szegedy et al. 2016, uniform prior)
    want = sum(0.9 * -logp[i, y[i]] + 0.1 * -logp[i].mean() for i in range(5)) / 5
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("size", [4, 3, 1])  # an odd side too: the square is size x size, not (size - 1) x (size - 1)
def test_cutout_sets_one_clipped_square_per_image_and_leaves_the_rest(size):
    plain, cut = batches(), batches(cutout=size)
    ds = data()
    fill = ds.train_x.float().mean((0, 2, 3)) / 255
    full = 0
    for (x0, y0), (x1, y1) in zip(plain, cut):
        assert torch.equal(y0, y1)  # same order
        for a, b in zip(x0, x1):
            changed = (a != b).any(0)
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            if len(rows):
                r0, r1, c0, c1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
                assert r1 - r0 <= size and c1 - c0 <= size
                box = b[:, r0:r1, c0:c1]
                assert torch.allclose(box, fill.view(3, 1, 1).expand_as(box))  # the whole box is the mean
                full += (r1 - r0, c1 - c0) == (size, size)
    assert full > len(cut) * 16 / 4  # most squares lie wholly inside an 8x8 image


def test_cutout_that_would_blank_every_image_is_an_error():
    ds = data()  # 8x8 images: a side of 15 covers all of one wherever its centre (--cutout 16 on digits did so)
    with pytest.raises(DataError, match="cutout 15 blanks every 8x8 image wholly"):
        Loader(ds.train_x, ds.train_y, 16, train=True, cutout=15)
    x, _ = next(iter(Loader(ds.train_x, ds.train_y, 16, train=True, cutout=14)))  # one row or column is left
    assert (x != x[:, :, :1, :1]).any()


@pytest.mark.parametrize("options, message", [
    ({"mixup": float("nan")}, "mixup must be >= 0, got nan"), ({"cutmix": -1.0}, "cutmix must be >= 0"),
    ({"cutout": -3}, "cutout must be >= 0"), ({"mixup": 1.0, "mix_prob": 5.0}, "mix_prob must be in [0, 1]"),
])
def test_loader_rejects_bad_regularizer_values(options, message):
    ds = data()  # TrainConfig checks these for lwat train; the Loader is also used on its own
    with pytest.raises(DataError, match=re.escape(message)):
        Loader(ds.train_x, ds.train_y, 16, train=True, num_classes=10, **options)


def test_mixup_mixes_each_batch_with_one_lambda_and_a_permutation():
    plain, mixed = batches(), batches(mixup=1.0)
    lams = []
    for (x0, y0), (x1, t1) in zip(plain, mixed):
        assert t1.shape == (16, 10) and torch.allclose(t1.sum(1), torch.ones(16))
        two = [i for i in range(16) if (t1[i] > 0).sum() == 2]  # rows mixed with a row of another class
        lam = t1[two[0], y0[two[0]]].item()
        partners = []
        for i in range(16):  # x1[i] = lam x0[i] + (1 - lam) x0[j] for exactly one j
            errs = [float((x1[i] - lam * x0[i] - (1 - lam) * x0[j]).abs().max()) for j in range(16)]
            j = int(np.argmin(errs))
            assert errs[j] < 1e-5 and sorted(errs)[1] > 1e-3
            want = lam * F.one_hot(y0[i], 10) + (1 - lam) * F.one_hot(y0[j], 10)
            assert torch.allclose(t1[i], want.float(), atol=1e-5)  # the same lam in every row
            partners.append(j)
        assert sorted(partners) == list(range(16))  # a permutation
        lams.append(lam)
    assert len(set(round(v, 4) for v in lams)) == len(lams)  # drawn anew per batch


def test_mixup_lambda_follows_beta_alpha_alpha():
    from scipy import stats

    ds = synthetic_dataset(n_train=800, n_test=8, size=4, channels=1)
    loader = Loader(ds.train_x, ds.train_y, 2, train=True, flip=False, seed=0, mixup=0.4, num_classes=10)
    # batches of two rows of two classes, swapped: t[0] = lam e_a + (1 - lam) e_b (unswapped rows are unmixed)
    lams = [float(t[0][t[0] > 0].max()) for _, t in loader.iter_from(0) if (t[0] > 0).sum() == 2]
    folded = [max(v, 1 - v) for v in lams]  # which of lam and 1 - lam is row 0's depends on the permutation
    p = stats.kstest(folded, lambda v: 2 * stats.beta(0.4, 0.4).cdf(v) - 1).pvalue
    assert len(folded) > 100 and p > 1e-3


def test_cutmix_pastes_one_box_per_batch_and_weights_labels_by_area():
    plain, mixed = batches(crop=False), batches(crop=False, cutmix=1.0)  # no zero padding: boxes are told apart
    for (x0, y0), (x1, t1) in zip(plain, mixed):
        changed = (x1 != x0).any(1).any(0)  # pixels changed in any image
        if not changed.any():
            continue
        for i in range(16):
            own = t1[i, y0[i]].item()
            j = next(j for j in range(16) if torch.equal(x1[i][:, changed], x0[j][:, changed]))
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            box = torch.zeros(8, 8, dtype=torch.bool)
            box[r0:r1, c0:c1] = True
            assert torch.equal(x1[i][:, ~box], x0[i][:, ~box]) and torch.equal(x1[i][:, box], x0[j][:, box])
            lam = 1 - box.sum().item() / 64  # the share of the image left uncut (Yun et al. 2019)
            want = lam * F.one_hot(y0[i], 10) + (1 - lam) * F.one_hot(y0[j], 10)
            assert torch.allclose(t1[i], want.float(), atol=1e-6)
            assert own >= lam - 1e-6


def test_mix_prob_and_options_leave_the_batch_order():
    plain, some = batches(), batches(cutmix=1.0, mix_prob=0.0)
    for (x0, y0), (x1, t1) in zip(plain, some):
        assert torch.equal(x0, x1) and torch.equal(F.one_hot(y0, 10).float(), t1)


def test_ema_is_the_hand_written_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = None
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).sum().backward()
        opt.step()
        ema.update_parameters(model)
        now = {k: v.clone().float() for k, v in model.state_dict().items()}
        avg = now if avg is None else {k: 0.9 * avg[k] + 0.1 * now[k] for k in now}  # the first update copies
    for k, v in ema.module.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.allclose(v.float(), avg[k], atol=1e-6), k


def test_ema_run_tests_and_evaluates_the_average(tmp_path):
    cfg = TrainConfig(model="resnet20", width=0.25, dataset="synthetic", epochs=2, batch_size=32, ema=0.8,
                      device="cpu")
    metrics = train(cfg, tmp_path / "r", progress="none")
    ckpt = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)
    model, _, _ = load_run(tmp_path / "r")
    raw = copy.deepcopy(model)
    raw.load_state_dict(ckpt["model"])
    averaged = {k: v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, averaged["module." + k])
    assert any(not torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    from lwat.data import load_dataset
    ds = load_dataset("synthetic")
    with torch.no_grad():
        acc = (model(ds.test_x.float() / 255).argmax(1) == ds.test_y).float().mean().item()
    assert metrics["test_acc"] == pytest.approx(acc)


def sam_reference(model, x, y, rho, adaptive, lr=0.1, momentum=0.9, wd=5e-4):
    """One SAM step (Foret et al. 2021, Alg. 1; ASAM: Kwon et al. 2021, eq. 4) with SGD, written out."""
    params = [p.detach().clone() for p in model.parameters()]
    ref = copy.deepcopy(model)
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    scale = [p.abs() if adaptive else torch.ones_like(p) for p in params]
    norm = math.sqrt(sum(float(((s * gi) ** 2).sum()) for s, gi in zip(scale, g)))
    with torch.no_grad():
        for p, w, s, gi in zip(ref.parameters(), params, scale, g):
            p.copy_(w + rho * s * s * gi / (norm + 1e-12))
    state = {k: v.clone() for k, v in ref.state_dict().items() if "running" in k}
    g2 = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    # SGD with Nesterov momentum, first step (buffer = d): w - lr (d + momentum d), d = g2 + wd w
    new = [w - lr * ((gi + wd * w) * (1 + momentum)) for w, gi in zip(params, g2)]
    return new, state


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("method", ["baseline", "lat"])
def test_sam_step_is_the_hand_written_step(method, adaptive):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    rho = 0.5 if adaptive else 0.05
    cfg = TrainConfig(method=method, sam=rho, sam_adaptive=adaptive)
    want, bn_after_first_pass = sam_reference(model, x, y, rho, adaptive)  # lat: the first batch is unperturbed
    handle = lwat.attach(model, 10.0) if method == "lat" else None
    opt = make_optimizer(model, cfg)
    sam_step(get_method(method), model, handle, x, y, cfg, make_passes(model, handle), opt)
    opt.second_step()
    for p, w in zip(model.parameters(), want):
        assert torch.allclose(p, w, atol=1e-6)
    for k, v in bn_after_first_pass.items():  # the second pass leaves the BatchNorm statistics alone
        assert torch.allclose(model.state_dict()[k], v), k
    assert handle is None or handle.capture  # capture is back on


def test_sam_with_lat_refreshes_the_cache_from_the_second_pass():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = TrainConfig(method="lat", sam=0.05)
    handle = lwat.attach(model, 10.0)
    opt = make_optimizer(model, cfg)
    sam_step(get_method("lat"), model, handle, x, y, cfg, make_passes(model, handle), opt)
    # Hand reference: the BatchNorm output's gradient at w + e (the weights now), first batch so unperturbed.
    got = handle.state_dict()["1"]["signs"]
    handle.detach()
    act = {}
    model[1].register_forward_hook(lambda m, i, o: act.setdefault("a", o.retain_grad() or o))
    F.cross_entropy(model(x), y).backward()
    assert torch.equal(got, act["a"].grad.sign().to(torch.int8))


def test_augmented_batches_keep_channels_last():
    ds = data()
    for options in ({"cutout": 4}, {"mixup": 1.0}, {"cutmix": 1.0}):
        x, _ = next(iter(Loader(ds.train_x, ds.train_y, 16, train=True, channels_last=True, num_classes=10,
                                **options)))
        assert x.is_contiguous(memory_format=torch.channels_last), options
