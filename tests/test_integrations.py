"""Tests shared by the framework integrations: the hand reference of one step's cache, lwat without the
frameworks, and the three examples/ scripts run as a user would run them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lwat

ROOT = Path(__file__).resolve().parent.parent


def reference_cache(model, points, cache, eps, loss_of, *, autocast=None, loss_scale=1.0):
    """One step of Algorithm 1 by hand on a plain model: what the cache must hold after it.

    Forward hooks add eps_l * r_l from `cache` (Eq. 6) at each point and keep the activation a; after the
    backward of loss_of(model) * loss_scale, the new cache is sign(dJ/da) and eps * (max - min) of the
    unscaled dJ/da (Eq. 5, scale="range").
    """
    acts = {}

    def perturb(name):
        def hook(module, args, out):
            entry = (cache or {}).get(name)
            if entry is not None and entry["signs"] is not None:
                out = torch.addcmul(out, entry["signs"], entry["scale"])
            out.retain_grad()
            acts[name] = out
            return out
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(perturb(name)) for name in points]
    try:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = loss_of(model)
        (loss * loss_scale).backward()
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for name, a in acts.items():
        g = a.grad.float() / loss_scale
        out[name] = {"signs": torch.sign(g).to(torch.int8), "scale": eps * (g.max() - g.min())}
    return out


def assert_same_cache(got, want, rtol=None):
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name]["signs"], want[name]["signs"]), name
        torch.testing.assert_close(got[name]["scale"], want[name]["scale"], rtol=rtol, atol=0 if rtol else None)


def clone_cache(cache):
    return {p: {k: None if v is None else v.detach().clone() for k, v in e.items()} for p, e in cache.items()}


# The plain loop runs where Lightning, transformers and accelerate cannot be imported: lwat needs none of them.
WITHOUT_FRAMEWORKS = ("import runpy, sys\n"
                      "sys.modules.update(lightning=None, transformers=None, accelerate=None)  # their import fails\n"
                      "import lwat, lwat.cli, lwat.integrations\n"
                      "try:\n"
                      "    import lwat.integrations.lightning\n"
                      "except ImportError as e:\n"
                      "    print('refused:', e.name)\n"
                      "sys.argv = sys.argv[1:]  # the script, then its arguments\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.parametrize("script, args", [
    ("plain_loop.py", ["--steps", "6"]),
    ("lightning_callback.py", ["--steps", "6"]),
    ("huggingface_trainer.py", ["--steps", "4"]),
])
def test_examples_run(script, args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    python = [sys.executable, "-c", WITHOUT_FRAMEWORKS] if script == "plain_loop.py" else [sys.executable]
    proc = subprocess.run([*python, str(ROOT / "examples" / script), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    if script == "plain_loop.py":
        assert lines[0].startswith("refused: lightning")  # the callback module does need Lightning
    assert lines[-1].startswith("trained ") and " steps with " in lines[-1] and " perturbation points" in lines[-1]


def callback_classes():
    """Each framework's callback class, or a skip where its framework is not installed."""
    def lightning():
        pytest.importorskip("lightning.pytorch")
        from lwat.integrations.lightning import LayerwiseAdversarialTraining
        return LayerwiseAdversarialTraining

    def huggingface():
        pytest.importorskip("transformers")
        from lwat.integrations.huggingface import LayerwiseAdversarialCallback
        return LayerwiseAdversarialCallback

    return [pytest.param(lightning, id="lightning"), pytest.param(huggingface, id="huggingface")]


@pytest.mark.parametrize("callback", callback_classes())
@pytest.mark.parametrize("args, message", [
    ({"eps": -1.0}, "eps must be a finite number >= 0, got -1.0"),
    ({"eps": "10"}, "eps must be a finite number >= 0, got '10'"),
    ({"scale": "fixd"}, "unknown scale 'fixd'; known: range, fixed"),
    ({"direction": "adversarial"}, "unknown direction 'adversarial'; known: gradient, random"),
    ({"kernels": "fast"}, "unknown kernels 'fast'; known: "),
    ({"points": "net.1"}, "points must be a non-empty list of module names"),
    ({"points": []}, "points must be a non-empty list of module names"),
    ({"points": [nn.LayerNorm]}, "points must be a non-empty list of module names"),
    ({"depth": 0}, r"depth must be an int >= 1 \(and at most the number of points\), got 0"),
    ({"depth": 1.5}, "depth must be an int >= 1"),
    ({"module": ""}, "module must be a submodule's"),
])
def test_callback_arguments_are_checked_when_it_is_made(callback, args, message):
    """A mistake fails where the callback is made, with `lwat.attach`'s message, not when training starts."""
    cls = callback()
    with pytest.raises(ValueError, match=message) as error:
        cls(**{"eps": 10.0, **args})
    if "depth" not in args and "module" not in args:  # the rest are lwat.attach's own words
        with pytest.raises(ValueError) as attach_error:
            model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2))
            lwat.attach(model, **{"eps": 10.0, **args})
        assert str(error.value) == str(attach_error.value)


@pytest.mark.parametrize("callback", callback_classes())
def test_callback_accepts_every_kind_of_point_selector(callback):
    cls = callback()
    for points in (None, ["net.1"], ("net.1", "net.4"), nn.LayerNorm, (nn.LayerNorm, nn.Linear),
                   lambda name, m: isinstance(m, nn.LayerNorm)):
        cls(10.0, points=points, depth=1, direction="random", scale="fixed", module="net")
