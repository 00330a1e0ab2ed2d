"""Tests for lwat.models: every registered model builds, runs, backprops, and counts right."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwat
from lwat.models import (MODELS, VGG16_POOL_BN_DEPTHS, Normalize, build_model, cifar_resnet,
                         list_models, vgg16_bn, vgg_pool_depths)
from lwat.models.common import CIFAR10_MEAN, CIFAR10_STD, cifar10_normalize

# Too big for a CPU forward pass; only built (parameter and BatchNorm counts).
BUILD_ONLY = {"wrn28_10", "wrn40_10"}
# Small but architecturally identical variants for the forward tests.
FORWARD_OPTIONS = {"vgg16_bn": {"width": 0.25}, "wrn": {"depth": 10, "widen_factor": 2}}
FORWARD_NAMES = [n for n in list_models() if n not in BUILD_ONLY]

# Parameters for 10 classes, counted by hand from the architectures, e.g. ResNet-20:
# stem 432 + 32, stage 1 3 * 4672, stage 2 13952 + 2 * 18560, stage 3 55552 + 2 * 73984, fc 650.
# WRN-28-10 36,479,194 is the count of the reference implementation (paper Table 7: 36.5M).
PARAM_COUNTS = {
    "mlp_tanh": 1024 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 10 + 10,  # 1,579,530
    "resnet20": 269_722,
    "resnet56": 853_018,
    "vgg16_bn": 14_991_946,
    "wrn16_4": 2_748_890,
    # ViT defaults (dim 64, 4 blocks, MLP 128, 64 tokens): patch 3*16*64 + 64, positions 64 * 64,
    # per block LN 128 + qkv 64*192 + 192 + proj 64*64 + 64 + LN 128 + fc1 64*128 + 128 + fc2 128*64 + 64,
    # final LN 128, head 64*10 + 10.
    "vit": 3136 + 4096 + 4 * (128 + 12480 + 4160 + 128 + 8320 + 8256) + 128 + 650,  # 141,898
}
# 2 per basic block + stem (ResNet); 13 conv + 1 classifier (VGG); 2 per block + final (WRN).
BN_COUNTS = {"mlp_tanh": 0, "resnet20": 19, "resnet56": 55, "vgg16_bn": 14, "wrn16_4": 13, "vit": 0}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_forward_backward(name, in_channels, device):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels,
                        **FORWARD_OPTIONS.get(name, {})).to(device).train()
    x = torch.rand(2, in_channels, 32, 32, device=device)  # pixels in [0, 1]
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 6], device=device)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_normalization_inside_and_out_of_state_dict(name):
    model = build_model(name, **FORWARD_OPTIONS.get(name, {}))
    norms = [n for n, m in model.named_modules() if isinstance(m, Normalize)]
    assert norms == ["normalize"]
    assert next(iter(model.children())) is model.normalize  # first layer
    keys = model.state_dict().keys()
    assert not [k for k in keys if k.startswith("normalize.")]
    # Strict round trip into a fresh model works without the buffers.
    build_model(name, **FORWARD_OPTIONS.get(name, {})).load_state_dict(model.state_dict())


@pytest.mark.parametrize("name", FORWARD_NAMES)
def test_batchnorm_registration_order_is_execution_order(name):
    # Perturbation points are found by walking modules; they must come in forward order.
    model = build_model(name, in_channels=1, **FORWARD_OPTIONS.get(name, {})).eval()
    registered = batchnorms(model)
    executed = []
    handles = [m.register_forward_hook(lambda m, i, o: executed.append(m)) for m in registered]
    with torch.no_grad():
        model(torch.rand(1, 1, 32, 32))
    for h in handles:
        h.remove()
    assert executed == registered


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_and_batchnorm_counts(name):
    model = build_model(name)
    assert n_params(model) == PARAM_COUNTS[name]
    assert len(batchnorms(model)) == BN_COUNTS[name]


def test_wrn28_10_matches_paper_size():
    model = build_model("wrn28_10")
    assert round(n_params(model) / 1e6, 1) == 36.5  # paper Table 7
    assert n_params(model) == 36_479_194  # reference WRN-28-10
    assert len(batchnorms(model)) == 25
    # The generic builder's defaults are WRN-28-10.
    assert n_params(build_model("wrn")) == n_params(model)


def test_wrn40_10_size():
    # Table 7 prints 51.0M; the architecture of the WRN paper has 55.8M.
    assert round(n_params(build_model("wrn40_10")) / 1e6, 1) == 55.8


def test_mlp_tanh_structure_and_digits_size():
    model = build_model("mlp_tanh")
    assert not batchnorms(model)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    digits = build_model("mlp_tanh", image_size=8)
    assert digits(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    with pytest.raises(ValueError, match="in_features"):
        build_model("mlp_tanh", in_features=100)


def test_vgg_dropout_layout():
    drops = [m.p for m in vgg16_bn(width=0.25, dropout=True).modules() if isinstance(m, nn.Dropout)]
    assert drops == [0.3] + [0.4] * 7 + [0.5, 0.5]  # cifar.torch vgg_bn_drop.lua
    no_drop = vgg16_bn(width=0.25)  # the default, as TrainConfig's
    assert not [m for m in no_drop.modules() if isinstance(m, nn.Dropout)]
    with pytest.raises(TypeError):
        vgg16_bn(dropout=0.5)


def test_vgg_pool_depths():
    assert list(VGG16_POOL_BN_DEPTHS) == [2, 4, 7, 10, 13]  # Table 6: conv1 to pool1..pool5
    assert vgg_pool_depths(vgg16_bn(width=0.25, dropout=True)) == [2, 4, 7, 10, 13]
    assert vgg_pool_depths(vgg16_bn(width=0.25)) == [2, 4, 7, 10, 13]


def test_normalize_matches_reference():
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(cifar10_normalize(3)(x), (x - mean) / std)
    gray = cifar10_normalize(1)
    assert gray.mean.item() == pytest.approx(0.299 * 0.4914 + 0.587 * 0.4822 + 0.114 * 0.4465)
    assert 0.23 < gray.std.item() < 0.25
    with pytest.raises(ValueError):
        cifar10_normalize(2)
    with pytest.raises(ValueError):
        Normalize((0.5, 0.5), (0.2,))


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'foo'") as err:
        build_model("foo")
    for name in MODELS:
        assert name in str(err.value)


def test_unknown_option_names_model_and_option():
    with pytest.raises(ValueError, match="resnet20") as err:
        build_model("resnet20", widht=2.0)
    assert "widht" in str(err.value)
    assert "in_channels" in str(err.value)  # lists what it accepts


def test_invalid_depths_rejected():
    with pytest.raises(ValueError):
        build_model("wrn", depth=27)
    with pytest.raises(ValueError):
        cifar_resnet(21)


def test_vit_layernorms_and_default_points():
    model = build_model("vit", depth=2).train()
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    executed = []  # LayerNorm points come in forward order, like BatchNorm ones
    handles = [dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: executed.append(n))
               for n in norms]
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert executed == norms
    # No BatchNorm: attach's default is the patch embedding and every Linear but the head.
    per_block = ["attn.qkv", "attn.proj", "mlp.0", "mlp.2"]
    expected = ["patch"] + [f"blocks.{b}.{n}" for b in range(2) for n in per_block]
    handle = lwat.attach(model, 10.0)
    assert handle.points == expected
    handle.detach()
    assert lwat.attach(model, 10.0, points=norms).points == norms


def test_vit_width_and_bad_sizes():
    # width scales the token width, rounded to a multiple of the heads: 64 * 0.3 = 19.2 -> 4 * 5 = 20
    assert build_model("vit", width=0.3).head.in_features == 20
    assert build_model("vit", width=2.0).head.in_features == 128
    assert build_model("vit", image_size=8, patch_size=2)(torch.rand(3, 3, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("vit", image_size=30)
    with pytest.raises(ValueError, match="width"):
        build_model("vit", width=0)
