"""Tests of lwat.attacks: FGSM / PGD against hand-written and ART references, eps-ball, modes, gradients."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lwat.attacks import ATTACKS, fgsm, get_attack, pgd


def conv_bn_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def trained(trained_mlp):
    """The shrunk toy MLP of conftest with float test images in [0, 1]."""
    model, x, y = trained_mlp
    return model, x.float() / 255, y


def manual_fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x.detach() + eps * g.sign()).clamp(0, 1)


def test_registry():
    assert ATTACKS == {"fgsm": fgsm, "pgd": pgd}
    assert get_attack("pgd") is pgd
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        get_attack("cw")


def test_fgsm_matches_manual(trained, device):
    model, x, y = trained
    model = copy.deepcopy(model).to(device)
    x, y = x.to(device), y.to(device)
    for eps in (0.0, 0.03, 0.3):
        adv = fgsm(model, x, y, eps)
        torch.testing.assert_close(adv, manual_fgsm(model, x, y, eps), rtol=0, atol=1e-6)
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def _art_classifier(model, x, device):
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                             nb_classes=10, clip_values=(0.0, 1.0),
                             device_type="gpu" if device.type == "cuda" else "cpu")


def test_fgsm_matches_art(trained, device):
    from_art = pytest.importorskip("art.attacks.evasion")
    model, x, y = trained
    model = copy.deepcopy(model).to(device)
    clf = _art_classifier(model, x, device)
    eps = 0.05
    ref = from_art.FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=len(x)).generate(x.numpy(), y=y.numpy())
    adv = fgsm(model, x.to(device), y.to(device), eps).cpu()
    np.testing.assert_allclose(adv.numpy(), ref, rtol=0, atol=1e-6)


def test_pgd_matches_art_without_random_start(trained, device):
    from_art = pytest.importorskip("art.attacks.evasion")
    model, x, y = trained
    model = copy.deepcopy(model).to(device)
    clf = _art_classifier(model, x, device)
    eps, steps, step = 0.05, 5, 0.02
    ref = from_art.ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
                                            num_random_init=0, batch_size=len(x), verbose=False)
    ref = ref.generate(x.numpy(), y=y.numpy())
    adv = pgd(model, x.to(device), y.to(device), eps, steps=steps, step_size=step, random_start=False).cpu()
    np.testing.assert_allclose(adv.numpy(), ref, rtol=0, atol=1e-6)


def test_pgd_random_start_by_hand(trained):
    """The seeded random start is x + U(-eps, eps), clipped to the ball and [0, 1] (steps=0 returns it), and it
    changes the attack's result (the ART comparison runs without it)."""
    model, x, y = trained
    eps = 0.1
    start = pgd(model, x, y, eps, steps=0, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    want = torch.minimum(torch.maximum(x + (2 * noise - 1) * eps, (x - eps).clamp(min=0)), (x + eps).clamp(max=1))
    torch.testing.assert_close(start, want, rtol=0, atol=0)
    assert not torch.equal(pgd(model, x, y, eps, generator=torch.Generator().manual_seed(1)),
                           pgd(model, x, y, eps, random_start=False))


def test_pgd_ball_box_and_strength(trained, device):
    model, x, y = trained
    model = copy.deepcopy(model).to(device)
    x, y = x.to(device), y.to(device)
    eps = 0.1
    g = torch.Generator().manual_seed(1)
    adv = pgd(model, x, y, eps, generator=g)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # Seeded random start is reproducible and differs from the deterministic start.
    again = pgd(model, x, y, eps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(adv, again, rtol=0, atol=0)
    # One full step from x is FGSM.
    torch.testing.assert_close(pgd(model, x, y, eps, steps=1, step_size=eps, random_start=False),
                               manual_fgsm(model, x, y, eps), rtol=0, atol=1e-6)
    # Ten small steps find a higher loss than FGSM's single step.
    with torch.no_grad():
        loss_fgsm = F.cross_entropy(model(fgsm(model, x, y, eps)), y)
        loss_pgd = F.cross_entropy(model(pgd(model, x, y, eps, random_start=False)), y)
    assert loss_pgd >= loss_fgsm


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_and_no_parameter_grads(attack, training, device):
    torch.manual_seed(0)
    model = conv_bn_net().to(device).train(training)
    if training:
        model[1].eval()  # a mixed-mode model keeps its mix
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(8, 1, 8, 8, device=device), torch.randint(0, 10, (8,), device=device)
    ATTACKS[attack](model, x, y, 0.1)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # eval inside: BatchNorm running statistics unchanged
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_mode_restored_on_exception(device):
    model = conv_bn_net().to(device).train()
    with pytest.raises(RuntimeError):
        fgsm(model, torch.rand(2, 3, 8, 8, device=device), torch.zeros(2, dtype=torch.long, device=device), 0.1)
    assert all(m.training for m in model.modules())


def test_existing_grads_untouched(trained):
    model, x, y = trained
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    pgd(model, x, y, 0.1, steps=2)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_bad_inputs():
    model = conv_bn_net()
    with pytest.raises(TypeError, match="float"):
        fgsm(model, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), -1.0)
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    assert torch.equal(fgsm(model, x, y, np.float32(0.25)), fgsm(model, x, y, 0.25))  # numpy numbers are numbers
