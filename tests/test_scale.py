"""Tests of the scale options: --amp bf16/fp16 (autocast, GradScaler), the cache under loss scaling and skipped
fp16 steps, --compile and --channels-last through the trainer. DDP is in test_distributed.py."""

import copy
import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwat
from test_methods import data, small_net as net
from lwat.cli import make_parser
from lwat.config import ConfigError, TrainConfig
from lwat.methods import PLAIN, get_method
from lwat.models import build_model
from lwat.rundir import CHECKPOINT, load_run, read_log
from lwat.train import make_passes, train

SMALL = dict(model="vgg16_bn", width=0.125, dropout=True, dataset="synthetic", train_subset=80, batch_size=16,
             epochs=2, eval_batch_size=128, lr_drop_every=1, crop=True, flip=True)


def batch(device, seed=0, n=8):
    return data(device, n=n, seed=seed)


def cache(handle):
    return {p: {k: v.clone() for k, v in c.items()} for p, c in handle.state_dict().items()}


def test_amp_config_and_flags():
    with pytest.raises(ConfigError, match="amp: unknown value 'fp32'; known: off, bf16, fp16"):
        TrainConfig(amp="fp32")
    args = make_parser().parse_args(["train", "--amp", "bf16", "--compile", "--channels-last"])
    assert (args.amp, args.compile, args.channels_last) == ("bf16", True, True)
    assert TrainConfig().amp == "off" and TrainConfig().compile is False


def test_kernels_config_reaches_the_handle_and_not_the_run_key():
    from lwat.reproduce import run_key
    from lwat.train import build
    with pytest.raises(ConfigError, match="kernels: unknown value 'fast'; known: aten, fused"):
        TrainConfig(kernels="fast")
    with pytest.raises(ConfigError, match="kernels: unknown value 'compiled'; known: aten, fused"):  # removed
        TrainConfig(kernels="compiled")
    args = make_parser().parse_args(["train", "--kernels", "fused"])
    assert args.kernels == "fused" and TrainConfig().kernels == "aten"
    cfg = TrainConfig(model="resnet20", width=0.25, kernels="fused")
    assert build(cfg, 10, (3, 32, 32))[1].kernels == "fused"
    assert run_key(cfg) == run_key(cfg.replace(kernels="aten"))  # speed, not the math: the same run


def test_bf16_autocast_runs_forward_in_bf16_and_caches_int8(device):
    torch.manual_seed(0)
    model = net().to(device)
    handle = lwat.attach(model, 10.0)
    run = make_passes(model, handle, amp="bf16", device_type=device.type)
    step = get_method("lat").step
    for seed in range(2):  # the second step is perturbed with the first one's cache
        loss, logits = step(model, handle, *batch(device, seed), TrainConfig(), run)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    for c in handle.state_dict().values():
        assert c["signs"].dtype == torch.int8 and c["scale"].dtype == torch.float32 and c["scale"] > 0
    assert handle.grad_scale is None  # no scaler, no loss scale


@pytest.mark.parametrize("method", ["lat", "fgsm-inter"])
def test_grad_scaler_leaves_eps_l_signs_and_gradients_unchanged(method, device):
    """The same step with and without a GradScaler (fp32 forward, so only the scaling differs)."""
    torch.manual_seed(0)
    base = net().to(device)
    results = []
    for scaler in (None, torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)):
        model = copy.deepcopy(base)
        handle = lwat.attach(model, 10.0)
        run = make_passes(model, handle, device_type=device.type, scaler=scaler)
        for seed in range(2):
            for p in model.parameters():
                p.grad = None
            get_method(method).step(model, handle, *batch(device, seed), TrainConfig(), run)
        if scaler is not None:
            assert handle.grad_scale.item() == 2.0 ** 12
            scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
        results.append((cache(handle), [p.grad for p in model.parameters()]))
    (plain, plain_grads), (scaled, scaled_grads) = results
    for point in plain:
        assert torch.equal(plain[point]["signs"], scaled[point]["signs"]), point
        torch.testing.assert_close(plain[point]["scale"], scaled[point]["scale"])
    for g1, g2 in zip(plain_grads, scaled_grads):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("kernels", ["aten", "fused"])
def test_skipped_fp16_step_keeps_the_cache(kernels, device):
    """An fp16 backward that overflows (the scaler skips the step) leaves the previous signs and eps_l."""
    torch.manual_seed(0)
    model = net().to(device)
    handle = lwat.attach(model, 10.0, kernels=kernels)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = make_passes(model, handle, amp="fp16", device_type=device.type, scaler=scaler)

    def step(seed):
        opt.zero_grad(set_to_none=True)
        get_method("lat").step(model, handle, *batch(device, seed), TrainConfig(), run)
        scaler.step(opt)
        scaler.update()

    step(0)
    before, weights = cache(handle), copy.deepcopy(model.state_dict())
    scaler.update(new_scale=2.0 ** 24)  # dJ/dlogits x 2^24 overflows fp16 in the last layer's backward
    step(1)
    assert scaler.get_scale() == 2.0 ** 23  # the step was skipped and the scale halved
    for name, value in model.state_dict().items():
        if name.endswith("weight") or name.endswith("bias"):
            assert torch.equal(value, weights[name]), name
    for point, c in cache(handle).items():
        assert torch.equal(c["signs"], before[point]["signs"]) and torch.equal(c["scale"], before[point]["scale"])
    scaler.update(new_scale=2.0 ** 4)
    step(2)  # a good step refreshes the cache again
    assert all(not torch.equal(c["signs"], before[p]["signs"]) for p, c in cache(handle).items())
    assert all(torch.isfinite(c["scale"]) and c["scale"] > 0 for c in cache(handle).values())


def test_overflow_with_no_cache_yet_gives_an_unperturbed_next_pass(device):
    torch.manual_seed(0)
    model = net().to(device)
    handle = lwat.attach(model, 10.0)
    handle.grad_scale = torch.tensor(1.0, device=device)
    x, y = batch(device)
    (F.cross_entropy(model(x), y) * float("inf")).backward()  # every gradient inf or NaN
    assert all(c["scale"] == 0 for c in handle.state_dict().values())
    x2, _ = batch(device, 1)
    with torch.no_grad():
        perturbed = model(x2)
        with handle.paused():
            plain = model(x2)
    torch.testing.assert_close(perturbed, plain)


def test_methods_default_to_plain_passes(device):
    torch.manual_seed(0)
    base = net().to(device)
    losses = []
    for run in (PLAIN, make_passes(base, amp="off")):
        model = copy.deepcopy(base)
        losses.append(get_method("fgsm").step(model, None, *batch(device), TrainConfig(), run)[0])
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_resumes_bit_exact(amp, tmp_path, device):
    cfg = TrainConfig(**{**SMALL, "method": "lat", "device": str(device), "amp": amp, "channels_last": True})
    train(cfg, tmp_path / "full", progress="none")
    train(cfg, tmp_path / "resumed", progress="none", stop_after_steps=7)
    train(cfg, tmp_path / "resumed", resume=True, progress="none")
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert ("scale" in a["scaler"]) == (amp == "fp16") and a["scaler"] == b["scaler"]
    for key, value in a["model"].items():
        assert value.dtype != torch.bfloat16 and torch.equal(value, b["model"][key]), key  # fp32 weights
    for point, c in a["perturbation"].items():
        assert torch.equal(c["signs"], b["perturbation"][point]["signs"]), point
    losses = [[r["train_loss"] for r in read_log(tmp_path / run)] for run in ("full", "resumed")]
    assert losses[0] == losses[1]


def test_compiled_training_matches_eager(tmp_path, device, monkeypatch):
    # aot_eager: dynamo and autograd tracing exactly as with inductor, without minutes of C++ kernel compilation
    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    cfg = TrainConfig(model="mlp_tanh", dataset="digits", train_subset=160, batch_size=32, epochs=2, method="lat",
                      lr=0.05, crop=False, device=str(device))
    eager = train(cfg, tmp_path / "eager", progress="none")
    compiled = train(cfg.replace(compile=True), tmp_path / "compiled", progress="none")
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    a = torch.load(tmp_path / "eager" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "compiled" / CHECKPOINT, weights_only=True)
    assert a["model"].keys() == b["model"].keys()  # the plain model's keys: no "_orig_mod." prefix
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-3, atol=1e-5)
    load_run(tmp_path / "compiled")  # loads into a plain model


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def benchmark(name, monkeypatch):
    """The script benchmarks/<name>.py as a module, imported as `python benchmarks/<name>.py` runs it (its folder
    first on sys.path, where it finds race.py)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_race_rotates_the_order_each_round(monkeypatch):
    """Every contender runs once a round, timed only after the warm-up, in the order A B C, B C A, C A B, A B C..."""
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    contenders["A"] = lambda: (calls.append("A"), time.sleep(0.05))  # what is timed is the contender's call
    times = benchmark("race", monkeypatch).race(contenders, rounds=3, warmup=1)
    assert "".join(calls) == "ABC" "BCA" "CAB" "ABC"
    assert {name: len(t) for name, t in times.items()} == {"A": 3, "B": 3, "C": 3}
    assert min(times["A"]) >= 0.05 > max(times["B"] + times["C"])


def test_benchmark_row_against_hand_counts(device, monkeypatch):
    """benchmarks/step_overhead.py runs (one tiny row), so the lead's full table does not rot; its cache size is
    the hand count (1 byte per perturbed activation element, one fp32 scale per point) and its ratios and epoch
    estimates are those of its own step times."""
    bench = benchmark("step_overhead", monkeypatch)
    row = bench.bench("resnet20", width=0.25, batch=4, device=device, steps=1, warmup=1, mode="eager",
                      amp="bf16", eps=10.0, scale="range", channels_last=True, backend="inductor")
    model = build_model("resnet20", 10, width=0.25)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sizes = []
    hooks = [m.register_forward_hook(lambda m, a, out: sizes.append(out.numel())) for m in bns]
    model(torch.rand(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert row["cache B/elem"] == pytest.approx((sum(sizes) + 4 * len(bns)) / sum(sizes), rel=1e-12)
    assert (row["mode"], row["amp"]) == ("eager", "bf16")
    ms = {m: row[f"{m} ms"] for m in bench.METHODS}
    assert row["lat/baseline"] == pytest.approx(ms["lat"] / ms["baseline"])
    assert row["fgsm/baseline"] == pytest.approx(ms["fgsm"] / ms["baseline"])
    # bf16: the floor moves 1 + 2 + 1 bytes per element, the eager floor 1 + 2 * 2 + 2 + 1, over one bandwidth
    assert row["eager floor"] - 1 == pytest.approx(2 * (row["floor"] - 1), rel=1e-9) and row["floor"] > 1
    steps = 50_000 // 4  # a CIFAR-10 epoch of batches of 4
    assert row["epoch s (baseline / lat / fgsm)"] == " / ".join(f"{ms[m] * steps / 1e3:.1f}" for m in bench.METHODS)


def test_compiled_kernels_profile_splits_forward_and_backward(monkeypatch):
    """benchmarks/compiled_kernels.py counts inductor's kernels where they run: lat's signs (Eq. 5) are written by a
    kernel of the compiled backward, its addcmul (Eq. 6) by one of the forward, and the baseline has neither."""
    bench = benchmark("compiled_kernels", monkeypatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    kernels = {}
    # inductor's config.patch, not monkeypatch: monkeypatch's undo of a config entry left it hidden ("does not
    # exist") for every later compile in the process
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        for name in ("baseline", "lat"):
            model = copy.deepcopy(plain)
            if name == "lat":
                lwat.attach(model, 10.0)
            compiled = torch.compile(model)
            for _ in range(3):
                nn.functional.cross_entropy(compiled(x), y).backward()
            times = bench.profile(compiled, x, y, steps=1)
            kernels[name] = {part: [k for k in counter if bench.FUSED in k] for part, counter in times.items()}
            assert all(bench.summary(counter)[0] > 0 for counter in times.values())
    assert any("sign" in k for k in kernels["lat"]["backward"])
    assert any("addcmul" in k for k in kernels["lat"]["forward"])
    assert not any("sign" in k or "addcmul" in k for part in kernels["baseline"].values() for k in part)
