"""Tests of lwat.train: run directory, bit-exact resume after a mid-epoch stop, non-finite loss, signals."""

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from lwat import methods
from lwat.config import ConfigError, TrainConfig
from lwat.data import Loader
from lwat.models.vgg import vgg16_bn
from lwat.rundir import CHECKPOINT, load_run, read_log
from lwat.train import TrainingError, train

# 80 synthetic training images in batches of 16: 5 steps per epoch.
SMALL = dict(model="vgg16_bn", width=0.125, dropout=True, dataset="synthetic", train_subset=80, batch_size=16,
             epochs=2, eval_batch_size=128, lr_drop_every=1, crop=True, flip=True)


def cfg_for(method, device, **kw):
    return TrainConfig(**{**SMALL, "method": method, "device": str(device), **kw})


def test_run_directory_contents(tmp_path, device):
    cfg = cfg_for("lat", device)
    metrics = train(cfg, tmp_path / "run", progress="none")
    run = tmp_path / "run"
    assert TrainConfig.from_file(run / "config.json") == cfg
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    assert set(log[0]) >= {"epoch", "lr", "train_loss", "train_acc", "test_acc", "seconds", "images_per_s"}
    assert log[1]["lr"] == pytest.approx(log[0]["lr"] / 5)  # divided by 5 every lr_drop_every epochs
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert metrics["test_acc"] == log[-1]["test_acc"] and metrics["passes_per_step"] == 1
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "perturbation", "rng", "epoch", "batch"}
    assert ckpt["epoch"] == 2 and ckpt["perturbation"]["features.1"]["signs"].dtype == torch.int8
    model, loaded_cfg, meta = load_run(run)
    assert loaded_cfg == cfg and meta["num_classes"] == 10 and not model.training
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, run, progress="none")


@pytest.mark.parametrize("method, options", [
    ("lat", {}), ("random", {}), ("fgsm-inter", {}),
    ("lat", {"mixup": 1.0, "ema": 0.9, "cutout": 4}), ("lat", {"sam": 0.05, "cutmix": 1.0, "label_smoothing": 0.1}),
])
def test_resume_mid_epoch_is_bit_exact(method, options, tmp_path, device, deterministic):
    cfg = cfg_for(method, device, **options)
    train(cfg, tmp_path / "full", progress="none")
    stopped = train(cfg, tmp_path / "resumed", progress="none", stop_after_steps=7)  # epoch 2, batch 2 of 5
    assert stopped == {"status": "interrupted", "epoch": 1, "batch": 2, "run_dir": str(tmp_path / "resumed")}
    train(cfg, tmp_path / "resumed", resume=True, progress="none")
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in (a.get("ema") or {}).items():
        assert torch.equal(value, b["ema"][key]), key
    for point, cache in a["perturbation"].items():
        assert torch.equal(cache["signs"], b["perturbation"][point]["signs"]), point
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    for r1, r2 in zip(full, resumed):
        assert (r1["train_loss"], r1["test_acc"]) == (r2["train_loss"], r2["test_acc"])


def poison(monkeypatch, at_call):
    """The baseline's step returns a NaN loss at its `at_call`-th call."""
    calls = []
    real = methods.METHODS["baseline"]

    def poisoned(model, handle, x, y, cfg, run):
        calls.append(1)
        loss, logits = real.step(model, handle, x, y, cfg, run)
        return (loss * float("nan") if len(calls) == at_call else loss), logits

    monkeypatch.setitem(methods.METHODS, "baseline", methods.Method(poisoned, False, 1))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, device, monkeypatch):
    poison(monkeypatch, 7)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss .* epoch 2, batch 2.*last good checkpoint"):
        train(cfg_for("baseline", device), run, progress="none")
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0)  # the end of epoch 1, the last good state
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_non_finite_loss_before_the_first_checkpoint_leaves_the_directory_reusable(tmp_path, device, monkeypatch):
    """Nothing to keep: the message says so, and the same call can start again (no 'already holds a run')."""
    poison(monkeypatch, 2)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as error:
        train(cfg_for("baseline", device), run, progress="none")
    assert "before the first checkpoint: nothing was kept" in str(error.value) and "checkpoint is kept" not in str(
        error.value)
    poison(monkeypatch, 0)  # never
    metrics = train(cfg_for("baseline", device), run, progress="none")
    assert metrics["status"] == "finished" and [r["epoch"] for r in read_log(run)] == [1, 2]


def test_defaults_agree_for_a_run_with_no_flags():
    """One default per concept: `lwat train` with no flags drops the lr within its epochs, and the loader's and the
    VGG's own defaults are the config's."""
    cfg = TrainConfig()
    assert cfg.lr_drop_every < cfg.epochs
    loader = inspect.signature(Loader).parameters
    assert (loader["crop"].default, loader["flip"].default) == (cfg.crop, cfg.flip)
    assert inspect.signature(vgg16_bn).parameters["dropout"].default == cfg.dropout


def test_sigint_saves_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lwat", "train", "--model", "mlp_tanh", "--method", "lat", "--dataset", "digits",
           "--epochs", "500", "--batch-size", "32", "--device", "cpu", "--out", str(run), "--progress", "lines"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().startswith("epoch 1 ")  # training is under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "lwat train --resume" in err and "Traceback" not in err
    first = torch.load(run / CHECKPOINT, weights_only=True)
    resume = subprocess.Popen([sys.executable, "-m", "lwat", "train", "--resume", str(run), "--progress", "lines"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = resume.stdout.readline()
    resume.send_signal(signal.SIGTERM)
    out, err = resume.communicate(timeout=60)
    assert resume.returncode == 130, err
    second = torch.load(run / CHECKPOINT, weights_only=True)
    assert (second["epoch"], second["batch"]) > (first["epoch"], first["batch"])
    assert line.startswith(f"epoch {first['epoch'] + 1} ")  # it went on from where it stopped


def test_a_checkpoint_in_the_older_one_process_layout_resumes_bit_exact(tmp_path, device, deterministic):
    """Before lwat.cache a one-process checkpoint held its cache and RNG state as "perturbation" and "rng" beside
    the other keys, with no "ranks": such a checkpoint (a run stopped mid-epoch) resumes as it would have."""
    cfg = cfg_for("lat", device)
    train(cfg, tmp_path / "full", progress="none")
    train(cfg, tmp_path / "old", progress="none", stop_after_steps=7)
    ckpt = torch.load(tmp_path / "old" / CHECKPOINT, weights_only=True)
    assert ckpt["world_size"] == 1 and sorted(ckpt["ranks"]) == [0]  # today's layout (lwat.cache) ...
    for point, entry in ckpt["ranks"][0]["perturbation"].items():  # ... with rank 0's entry also at the top
        assert torch.equal(entry["signs"], ckpt["perturbation"][point]["signs"]), point
    del ckpt["ranks"]
    torch.save(ckpt, tmp_path / "old" / CHECKPOINT)
    (tmp_path / "old" / "checkpoint.prev.pt").unlink()
    train(cfg, tmp_path / "old", resume=True, progress="none")
    a, b = (torch.load(tmp_path / run / CHECKPOINT, weights_only=True) for run in ("full", "old"))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for point, entry in a["perturbation"].items():
        assert torch.equal(entry["signs"], b["perturbation"][point]["signs"]), point


def test_rundir_and_train_import_each_other_nowhere():
    """No import circle: lwat.rundir (and what it imports) never imports lwat.train."""
    code = "import sys, lwat.rundir, lwat.analysis.runs; sys.exit('lwat.train' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    source = inspect.getsource(__import__("lwat.rundir").rundir)
    assert "lwat.train" not in source.replace("`lwat.train` writes", "")


@pytest.mark.parametrize("compile", [True, False])
def test_compile_trains_inside_lwat_fusion_rule(compile, tmp_path, monkeypatch):
    """--compile is lwat's compiled path: every step (where inductor compiles the forward and, at the first
    backward, the backward that writes the cache) and the final evaluation run inside `lwat.fusion_rule()`, and
    inductor's own rule is back when train returns. Eager training never enters it. (The compiler itself is
    replaced by a no-op here: what is checked is the scope, not inductor; tests/test_perturb.py checks the rule.)"""
    import contextlib

    import lwat
    import lwat.train as lwat_train

    inside, seen = [], []

    @contextlib.contextmanager
    def rule():
        inside.append(True)
        yield
        inside.pop()
        seen.append("exited")

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, bool(inside)))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(lwat, "fusion_rule", rule)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)  # no C++ compiler needed here
    monkeypatch.setattr(lwat_train, "_train_epoch", recording("epoch", lwat_train._train_epoch))
    monkeypatch.setattr(lwat_train, "_finish", recording("finish", lwat_train._finish))
    train(cfg_for("lat", "cpu", epochs=1, compile=compile), tmp_path / "run", progress="none")
    assert seen == ([("epoch", True), ("finish", True), "exited"] if compile else [("epoch", False), ("finish", False)])
    help = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "compile")
    assert "lwat.fusion_rule()" in help, help  # lwat train --help says so
