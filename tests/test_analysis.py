"""Tests of lwat.analysis: every analysis end to end on a tiny model (numbers checked, PNG written)."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwat
from lwat.analysis import curves, depth, get_analysis, jacobian, robustness, strength, transfer, tsne
from lwat.data import synthetic_dataset
from lwat.models import build_model
from reference import (clean_predictions, fgsm_predictions, fraction, previous_batch_predictions,
                       random_input_predictions)


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


def test_unknown_analysis():
    assert get_analysis("tsne") is tsne
    with pytest.raises(ValueError, match="unknown analysis 'nope'"):
        get_analysis("nope")


def tolerance(device, y):
    # On CPU the numbers equal the hand references exactly; elsewhere kernels may flip one image's prediction.
    return 1e-12 if device.type == "cpu" else 1.5 / len(y)


def test_strength_against_hand_references(trained, data, device, tmp_path):
    x, y = data.test_x, data.test_y
    res = strength.compute(copy.deepcopy(trained).to(device), x, y, eps_list=(0, 0.1, 3.0), batch_size=16)
    assert res["eps"] == [0.0, 0.1, 3.0]
    assert set(res["accuracy"]) == {"fgsm", "layerwise", "input_prev", "input_random", "random"}
    points, tol = lwat.default_points(trained), tolerance(device, y)
    clean = fraction(clean_predictions(trained, x), y)
    for i, e in enumerate(res["eps"]):
        refs = {"fgsm": fgsm_predictions(trained, x, y, e, 16),
                "layerwise": previous_batch_predictions(copy.deepcopy(trained), x, y, e, points, 16),
                "input_prev": previous_batch_predictions(copy.deepcopy(trained), x, y, e, points, 16, input_only=True),
                "input_random": random_input_predictions(copy.deepcopy(trained).to(device), x, e, 16, seed=0)}
        for kind, pred in refs.items():
            assert res["accuracy"][kind][i] == pytest.approx(fraction(pred, y), abs=tol), (kind, e)
    assert res["accuracy"]["random"][0] == pytest.approx(clean, abs=tol)  # random signs of size 0: clean
    deltas = []  # at every point: |delta| = eps, and about half of the signs positive
    first = dict(trained.named_modules())[points[0]]
    hook = first.register_forward_hook(lambda m, a, out: deltas.append(out - F.linear(a[0], m.weight, m.bias)))
    try:
        strength.compute(trained, x, y, eps_list=(0.5,), batch_size=16, kinds=("random",))
    finally:
        hook.remove()
    d = torch.cat(deltas[1:]).detach()  # batch 0 is clean
    assert torch.allclose(d.abs(), torch.full_like(d, 0.5), atol=1e-5)
    assert (d > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    both = strength.compute(copy.deepcopy(trained), x, y, eps_list=(0.5,), batch_size=16, kinds=("random", "layerwise"))
    assert both["accuracy"]["random"][0] > both["accuracy"]["layerwise"][0]  # random signs, not the gradient's
    seeded = strength.compute(copy.deepcopy(trained), x, y, eps_list=(0.5,), batch_size=16, kinds=("input_random",),
                              seed=1)
    ref = fraction(random_input_predictions(copy.deepcopy(trained), x, 0.5, 16, seed=1), y)
    assert seeded["accuracy"]["input_random"][0] == pytest.approx(ref, abs=tol)
    assert res["accuracy"]["layerwise"][2] < clean  # and the references themselves are not the clean model
    assert res["accuracy"]["input_random"][2] < clean  # random signs of size 3 at the input destroy the images
    only = strength.compute(copy.deepcopy(trained).to(device), x, y, eps_list=(0.1,), batch_size=16,
                            kinds=("input_random",))
    assert only["accuracy"] == {"input_random": [res["accuracy"]["input_random"][1]]}
    with pytest.raises(ValueError, match="unknown kind"):
        strength.compute(trained, x, y, kinds=("sideways",))
    rows = strength.to_rows(res)
    assert len(rows) == 15 and set(rows[0]) == {"kind", "eps", "accuracy"}
    strength.plot(res, tmp_path / "strength.png")
    assert_png(tmp_path / "strength.png")


def gaussian_reference(model, x, eps, points, batch_size, seed):
    """Figure 1's random row by hand: eps * N(0, 1) noise added at each point, drawn from one generator seeded with
    `seed`, batch by batch, point by point in forward order; returns (penultimate features, predictions)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, out: out + eps * torch.randn(out.shape, generator=g))
             for n in points]
    feats, preds = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                h = model.layers[:-1](model.normalize(x[i:i + batch_size].float() / 255))
                feats.append(h)
                preds.append(model.layers[-1](h).argmax(1))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(feats), torch.cat(preds)


def test_tsne_against_hand_references(trained, data, tmp_path):
    from sklearn.manifold import TSNE

    x, y = data.test_x, data.test_y
    res = tsne.compute(copy.deepcopy(trained), x, y, classes=(2, 5), eps_list=(0, 2.0), n_per_class=6, seed=0,
                       batch_size=16)
    idx = torch.cat([torch.nonzero(y == c).flatten()[:6] for c in (2, 5)]).sort().values
    assert res["labels"].tolist() == y[idx].tolist()
    points = lwat.default_points(trained)
    for i, e in enumerate(res["eps"]):
        adversarial = previous_batch_predictions(copy.deepcopy(trained), x, y, e, points, 16)[idx]  # all of x streamed
        feats, random = gaussian_reference(trained, x[idx], e, points, 16, seed=0)
        assert res["accuracy"]["adversarial"][i] == pytest.approx(fraction(adversarial, y[idx]), abs=1e-12), e
        assert res["accuracy"]["random"][i] == pytest.approx(fraction(random, y[idx]), abs=1e-12), e
        embedding = TSNE(2, perplexity=(len(idx) - 1) / 3, init="pca", random_state=0).fit_transform(
            feats.double().numpy())
        np.testing.assert_allclose(res["embedding"]["random"][i], embedding, rtol=1e-6, atol=1e-6)
    assert res["accuracy"]["adversarial"][1] < res["accuracy"]["adversarial"][0]
    # The adversarial embedding is of the perturbed features: at eps 0 it is the random one's (clean features, same
    # t-SNE seed), at eps 2 it moved.
    np.testing.assert_allclose(res["embedding"]["adversarial"][0], res["embedding"]["random"][0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(res["embedding"]["adversarial"][1], res["embedding"]["adversarial"][0])
    assert len(tsne.to_rows(res)) == 2 * 2 * len(idx)
    assert tsne.summary_rows(res) == [{"kind": k, "eps": e, "accuracy": res["accuracy"][k][i]}
                                      for k in ("adversarial", "random") for i, e in enumerate(res["eps"])]
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


def test_transfer_against_hand_fgsm(trained, data, device, tmp_path):
    torch.manual_seed(2)
    other = fit(build_model("mlp_tanh", 10, image_size=8, hidden=(24,)), data)
    x, y = data.test_x, data.test_y
    sources = {"self": copy.deepcopy(trained).to(device), "other": copy.deepcopy(other).to(device)}
    res = transfer.compute(sources, copy.deepcopy(trained).to(device), x, y, eps_list=(0, 0.05, 0.2), batch_size=20)
    tol = tolerance(device, y)
    for name, source in (("self", trained), ("other", other)):
        for i, e in enumerate(res["eps"]):  # FGSM crafted on the source, classified by the target, by hand
            ref = fraction(fgsm_predictions(trained, x, y, e, 20, source=source), y)
            assert res["accuracy"][name][i] == pytest.approx(ref, abs=tol), (name, e)
    assert res["accuracy"]["self"][2] != res["accuracy"]["other"][2]  # the source matters
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


def test_table1_control_script_averages_the_seeds(tmp_path):
    """results/diagnostics/table1_control.py: mean ± sample std over the seed folders, per kind and eps."""
    rows = {0: [("fgsm", 0.0, 0.60), ("fgsm", 0.1, 0.10), ("input_random", 0.1, 0.50)],
            1: [("fgsm", 0.0, 0.64), ("fgsm", 0.1, 0.20), ("input_random", 0.1, 0.40)]}
    for seed, kinds in rows.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "strength.json").write_text(json.dumps(
            {"rows": [{"kind": k, "eps": e, "accuracy": a} for k, e, a in kinds]}))
    script = Path(__file__).parent.parent / "results" / "diagnostics" / "table1_control.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "n=2 retrained models" in out
    # 60 and 64: mean 62, sample std 2.83; 10 and 20: 15 ± 7.07; 50 and 40: 45 ± 7.07
    assert "| FGSM at the input | 62.00 ± 2.83 | 15.00 ± 7.07 |" in out
    assert "| random signs, input only (the control) | — | 45.00 ± 7.07 |" in out
