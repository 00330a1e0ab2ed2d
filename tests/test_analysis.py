"""Tests of lwat.analysis: every analysis end to end on a tiny model (numbers checked, PNG written)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lwat.analysis import ANALYSES, curves, depth, get_analysis, jacobian, robustness, strength, transfer, tsne
from lwat.data import synthetic_dataset
from lwat.evaluate import accuracy
from lwat.models import build_model


def fit(model, ds, steps=60, lr=0.2):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x = ds.train_x.float() / 255
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), ds.train_y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


@pytest.fixture(scope="module")
def data(one_thread):
    return synthetic_dataset(n_train=64, n_test=64, size=8, channels=1)


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    return fit(build_model("mlp_tanh", 10, image_size=8, hidden=(32, 16)), data)


def assert_png(path):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registry():
    assert set(ANALYSES) == {"strength", "tsne", "jacobian", "transfer", "depth", "curves", "robustness"}
    for module in ANALYSES.values():
        assert callable(module.compute) and callable(module.plot) and callable(module.to_rows)
    assert get_analysis("tsne") is tsne
    with pytest.raises(ValueError, match="unknown analysis 'nope'"):
        get_analysis("nope")


def test_strength(trained, data, device, tmp_path):
    model = copy.deepcopy(trained).to(device)
    res = strength.compute(model, data.test_x, data.test_y, eps_list=(0, 0.1, 3.0), batch_size=16)
    clean = accuracy(model, data.test_x, data.test_y)
    assert res["eps"] == [0.0, 0.1, 3.0]
    assert set(res["accuracy"]) == {"fgsm", "layerwise", "input_prev", "random"}
    for kind, values in res["accuracy"].items():
        assert values[0] == pytest.approx(clean, abs=1e-12), kind
        assert all(0 <= v <= 1 for v in values)
    assert res["accuracy"]["fgsm"][2] < clean and res["accuracy"]["layerwise"][2] < clean
    rows = strength.to_rows(res)
    assert len(rows) == 12 and set(rows[0]) == {"kind", "eps", "accuracy"}
    strength.plot(res, tmp_path / "strength.png")
    assert_png(tmp_path / "strength.png")


def test_tsne(trained, data, device, tmp_path):
    model = copy.deepcopy(trained).to(device)
    res = tsne.compute(model, data.test_x, data.test_y, classes=(2, 5), eps_list=(0, 2.0), n_per_class=6,
                       seed=0, batch_size=16)
    n = int(((data.test_y == 2).sum().clip(max=6) + (data.test_y == 5).sum().clip(max=6)).item())
    assert sorted(set(res["labels"].tolist())) == [2, 5] and len(res["labels"]) == n
    for kind in ("adversarial", "random"):
        assert len(res["embedding"][kind]) == 2
        assert all(e.shape == (n, 2) and np.isfinite(e).all() for e in res["embedding"][kind])
    # eps 0: both kinds are the clean accuracy on the shown images.
    mask = (data.test_y == 2) | (data.test_y == 5)
    idx = torch.nonzero(mask).flatten()
    idx = torch.cat([idx[data.test_y[idx] == 2][:6], idx[data.test_y[idx] == 5][:6]])
    clean = accuracy(model, data.test_x[idx], data.test_y[idx])
    assert res["accuracy"]["adversarial"][0] == pytest.approx(clean)
    assert res["accuracy"]["random"][0] == pytest.approx(clean)
    # Same seed, same embedding.
    again = tsne.compute(model, data.test_x, data.test_y, classes=(2, 5), eps_list=(0, 2.0), n_per_class=6,
                         seed=0, batch_size=16)
    np.testing.assert_allclose(again["embedding"]["random"][1], res["embedding"]["random"][1])
    assert len(tsne.to_rows(res)) == 2 * 2 * n
    tsne.plot(res, tmp_path / "tsne.png")
    assert_png(tmp_path / "tsne.png")


def test_jacobian_of_linear_encoder_is_its_singular_values(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 12), nn.Linear(12, 5)).to(device)
    res = jacobian.compute({"linear": model}, torch.rand(7, 3, 4, 4), top=50, batch_size=3)
    ref = torch.linalg.svdvals(model[1].weight.detach()).cpu().double().numpy()
    assert res["index"].tolist() == list(range(1, 13)) and res["n"] == 7
    np.testing.assert_allclose(res["mean"]["linear"], ref, rtol=1e-5)
    np.testing.assert_allclose(res["std"]["linear"], 0, atol=1e-5)  # the same Jacobian for every image


def test_jacobian_matches_autograd(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 6), nn.Tanh(),
                          nn.Linear(6, 3)).to(device)
    x = torch.rand(5, 1, 4, 4, device=device)
    got = torch.cat(list(jacobian.jacobians(model, x, batch_size=2)))
    assert got.shape == (5, 6, 16)
    for i in range(5):
        ref = torch.autograd.functional.jacobian(lambda v: model[:-1](v.view(1, 1, 4, 4)).flatten(), x[i].flatten())
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_jacobian_end_to_end(trained, data, device, tmp_path):
    torch.manual_seed(1)
    conv_bn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 8 * 8, 8), nn.Tanh(), nn.Linear(8, 10)).to(device).train()
    models = {"mlp": copy.deepcopy(trained).to(device), "conv-bn": conv_bn}
    res = jacobian.compute(models, data.test_x[:10], top=5, batch_size=4)
    assert res["mean"]["mlp"].shape == (5,) and res["mean"]["conv-bn"].shape == (5,)
    assert all(np.all(np.diff(v) <= 1e-9) for v in res["mean"].values())  # sorted descending
    assert conv_bn.training  # mode restored
    assert len(jacobian.to_rows(res)) == 10
    jacobian.plot(res, tmp_path / "jacobian.png")
    assert_png(tmp_path / "jacobian.png")


def test_transfer(trained, data, device, tmp_path):
    torch.manual_seed(2)
    other = fit(build_model("mlp_tanh", 10, image_size=8, hidden=(24,)), data).to(device)
    target = copy.deepcopy(trained).to(device)
    sources = {"self": target, "other": other}
    res = transfer.compute(sources, target, data.test_x, data.test_y, eps_list=(0, 0.05, 0.2), batch_size=20)
    clean = accuracy(target, data.test_x, data.test_y)
    assert res["accuracy"]["self"][0] == res["accuracy"]["other"][0] == pytest.approx(clean)
    # Crafted on the target itself: plain white-box FGSM accuracy.
    assert res["accuracy"]["self"][2] == pytest.approx(
        accuracy(target, data.test_x, data.test_y, attack="fgsm", eps=0.2))
    assert len(transfer.to_rows(res)) == 6
    transfer.plot(res, tmp_path / "transfer.png")
    assert_png(tmp_path / "transfer.png")


def test_depth(tmp_path):
    records = [
        {"label": "pool2", "depth": 4, "accuracy": 0.90, "seed": 0},
        {"label": "all", "depth": None, "accuracy": 0.913},
        {"label": "pool1", "depth": 2, "accuracy": 0.895},
        {"label": "pool2", "depth": 4, "accuracy": 0.92, "seed": 1},
        {"label": "baseline", "depth": None, "accuracy": 0.894},
    ]
    res = depth.compute(records)
    assert [r["label"] for r in res["rows"]] == ["pool1", "pool2", "all"]
    pool2 = res["rows"][1]
    assert pool2["n"] == 2 and pool2["mean"] == pytest.approx(0.91)
    assert pool2["std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert res["rows"][0]["std"] == 0.0
    assert res["baseline"] == {"mean": pytest.approx(0.894), "std": 0.0, "n": 1}
    assert depth.to_rows(res)[-1]["label"] == "baseline"
    depth.plot(res, tmp_path / "depth.png")
    assert_png(tmp_path / "depth.png")
    assert depth.compute(records[:1], baseline=0.5)["baseline"]["mean"] == 0.5
    with pytest.raises(ValueError, match="several depths"):
        depth.compute(records + [{"label": "pool1", "depth": 3, "accuracy": 0.9}])
    with pytest.raises(ValueError, match="lacks"):
        depth.compute([{"label": "pool1", "accuracy": 0.9}])


def test_curves(tmp_path):
    logs = {
        "baseline": [{"epoch": 1, "train_acc": 0.6, "test_acc": 0.55}, {"epoch": 0, "train_acc": 0.3, "test_acc": 0.35},
                     {"step": 10, "loss": 1.0}],
        "perturbed": [{"epoch": 0, "train_acc": 0.25, "test_acc": 0.4}, {"epoch": 1, "train_acc": 0.5}],
    }
    res = curves.compute(logs)
    np.testing.assert_array_equal(res["baseline"]["epoch"], [0, 1])
    np.testing.assert_allclose(res["baseline"]["train_error"], [0.7, 0.4])
    np.testing.assert_allclose(res["baseline"]["test_error"], [0.65, 0.45])
    assert math.isnan(res["perturbed"]["test_error"][1])
    rows = curves.to_rows(res)
    assert len(rows) == 4 and rows[0] == {"run": "baseline", "epoch": 0, "train_error": pytest.approx(0.7),
                                          "test_error": pytest.approx(0.65)}
    curves.plot(res, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="no record"):
        curves.compute({"x": [{"step": 1}]})


def test_robustness(tmp_path):
    records = [
        {"label": "lat", "panel": "pixel units", "eps": 0.02, "accuracy": 0.10},
        {"label": "lat", "panel": "pixel units", "eps": 0.0, "accuracy": 0.68},
        {"label": "lat", "panel": "pixel units", "eps": 0.02, "accuracy": 0.14},
        {"label": "fgsm", "panel": "pixel units", "eps": 0.02, "accuracy": 0.27},
        {"label": "lat", "panel": "standardized units", "eps": 0.02, "accuracy": 0.41},
    ]
    res = robustness.compute(records)
    assert list(res) == ["pixel units", "standardized units"] and list(res["pixel units"]) == ["lat", "fgsm"]
    clean, attacked = res["pixel units"]["lat"]  # sorted by eps; the two seeds at 0.02 averaged
    assert clean == {"eps": 0.0, "mean": pytest.approx(0.68), "std": 0.0, "n": 1}
    assert attacked["n"] == 2 and attacked["mean"] == pytest.approx(0.12)
    assert attacked["std"] == pytest.approx(np.std([0.10, 0.14], ddof=1))
    rows = robustness.to_rows(res)
    assert len(rows) == 4 and rows[-1] == {"panel": "standardized units", "label": "lat", "eps": 0.02,
                                           "mean": pytest.approx(0.41), "std": 0.0, "n": 1}
    robustness.plot(res, tmp_path / "robustness.png")
    assert_png(tmp_path / "robustness.png")
    with pytest.raises(ValueError, match="lacks"):
        robustness.compute([{"label": "lat", "eps": 0.0, "accuracy": 0.5}])
