"""Tests of lwat.rundir: the previous checkpoint kept, damaged checkpoints as one-line errors, provenance in host.json."""

import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import lwat
from lwat import rundir
from lwat.cli import main
from lwat.config import ConfigError, TrainConfig
from lwat.train import train
from test_data import make_cifar10, make_targz

# 256 synthetic training images in batches of 32: 8 steps per epoch.
SMALL = dict(model="mlp_tanh", dataset="synthetic", epochs=2, batch_size=32, device="cpu")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def interrupted_run(path: Path) -> Path:
    """A run stopped at epoch 2, batch 1: checkpoint.pt holds that step, checkpoint.prev.pt the end of epoch 1."""
    train(TrainConfig(**SMALL), path, progress="none", stop_after_steps=9)
    newest = torch.load(path / rundir.CHECKPOINT, weights_only=True)
    previous = torch.load(path / rundir.PREVIOUS, weights_only=True)
    assert (newest["epoch"], newest["batch"], previous["epoch"], previous["batch"]) == (1, 1, 1, 0)
    return path


def test_damaged_newest_checkpoint_resumes_from_the_previous_one_bit_exact(tmp_path, capsys):
    full = tmp_path / "full"
    train(TrainConfig(**SMALL), full, progress="none")
    assert not (full / rundir.PREVIOUS).exists()  # a completed run keeps its final checkpoint only
    run = interrupted_run(tmp_path / "run")
    (run / rundir.CHECKPOINT).write_bytes((run / rundir.CHECKPOINT).read_bytes()[:5000])  # a cut-short write
    code, _, err = run_cli(capsys, "train", "--resume", run, "--progress", "none")
    assert code == 0, err
    assert f"{run / rundir.CHECKPOINT}: not a readable lwat checkpoint" in err and str(run / rundir.PREVIOUS) in err
    assert [r["epoch"] for r in rundir.read_log(run)] == [1, 2]  # epoch 2 trained once, from its start
    a, b = (torch.load(d / rundir.CHECKPOINT, weights_only=True)["model"] for d in (full, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_both_checkpoints_damaged_is_one_line_exit_2(tmp_path, capsys):
    run = interrupted_run(tmp_path / "run")
    (run / rundir.CHECKPOINT).write_bytes((run / rundir.CHECKPOINT).read_bytes()[:5000])
    (run / rundir.PREVIOUS).write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--progress", "none")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lwat: error: {run / rundir.PREVIOUS}: not a readable lwat checkpoint")


def test_host_json_records_the_machine_the_code_and_the_data(tmp_path):
    folder, _ = make_cifar10(tmp_path / "src", n=4)
    (tmp_path / "data").mkdir()
    archive = make_targz(folder, tmp_path / "data" / "cifar-10-python.tar.gz")
    run = tmp_path / "run"
    train(TrainConfig(**{**SMALL, "dataset": "cifar10", "data_dir": str(archive), "epochs": 1, "batch_size": 5}),
          run, progress="none")
    host = json.loads((run / rundir.HOST).read_text())
    assert {"cpu", "cpu_count", "threads", "gpu", "torch", "lwat", "data_sha256"} <= set(host)
    assert host["data_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    root = Path(lwat.__file__).resolve().parents[1]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if git.returncode == 0:
        assert host["lwat"] == f"{lwat.__version__}+git{git.stdout.strip()[:12]}"
    else:
        assert host["lwat"] == lwat.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+git[0-9a-f]{12})?", host["lwat"])


def test_data_sha256_of_a_folder_is_the_sha256sum_manifest(tmp_path):
    folder, _ = make_cifar10(tmp_path / "data", n=2)
    (folder / "sub").mkdir()
    (folder / "sub" / "extra file").write_bytes(b"x")  # an image folder counts it; CIFAR reads the batches only

    def sha256sum(listing):
        return subprocess.run(f"{listing} | LC_ALL=C sort | tr '\\n' '\\0' | xargs -0 sha256sum | sha256sum",
                              shell=True, cwd=folder, capture_output=True, text=True, check=True).stdout.split()[0]

    images = TrainConfig(dataset="folder", data_dir=str(folder))
    assert rundir.data_sha256(images) == sha256sum("find . -type f")
    batches = " ".join(f"./{name}" for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                                 "data_batch_5", "test_batch", "batches.meta"))
    for where in (folder, folder.parent):  # the extracted folder, or the directory holding it
        cifar = TrainConfig(dataset="cifar10", data_dir=str(where))
        assert rundir.data_sha256(cifar) == sha256sum(f"printf '%s\\n' {batches}")
    assert rundir.data_sha256(TrainConfig(dataset="synthetic")) is None
    with pytest.MonkeyPatch.context() as mp:  # no data_dir: the CIFAR files where the loader reads them
        mp.setenv("LWAT_CACHE", str(folder.parent))
        assert rundir.data_sha256(TrainConfig(dataset="cifar10")) == sha256sum(f"printf '%s\\n' {batches}")
        mp.setenv("LWAT_CACHE", str(tmp_path / "empty"))
        assert rundir.data_sha256(TrainConfig(dataset="cifar10")) is None


def test_evaluate_run_keeps_a_finished_runs_other_eps(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**SMALL), run, progress="none")
    first = rundir.evaluate_run(run, eps_list=(0.0, 0.1), device="cpu")
    second = rundir.evaluate_run(run, eps_list=(0.05,), device="cpu")
    assert set(first["accuracy"]) == {"0", "0.1"} and set(second["accuracy"]) == {"0.05"}
    stored = json.loads((run / rundir.EVAL).read_text())
    assert stored["accuracy"] == {**first["accuracy"], **second["accuracy"]}
    # Another attack goes to its own file: reports read eval.json as FGSM, so PGD must never replace it there.
    pgd = rundir.evaluate_run(run, eps_list=(0.1,), attack="pgd", device="cpu")
    assert json.loads((run / rundir.EVAL).read_text()) == stored
    assert json.loads((run / "eval-pgd.json").read_text())["accuracy"] == pgd["accuracy"]
    assert rundir.read_run(run).eval == stored


def test_read_run_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        rundir.read_run(tmp_path)
    run = interrupted_run(tmp_path / "run")
    view = rundir.read_run(run)
    assert not view.finished and view.has_checkpoint and [r["epoch"] for r in view.log] == [1]


def test_a_kill_while_the_checkpoint_rotates_leaves_checkpoint_pt(tmp_path, monkeypatch):
    """Saving makes checkpoint.prev.pt a second name of the current checkpoint before the new one takes its name,
    so a kill between the two steps leaves checkpoint.pt as it was (two renames left no checkpoint.pt there); a
    resume then cleans up the interrupted write's temporary file."""
    run = interrupted_run(tmp_path / "run")
    before = (run / rundir.CHECKPOINT).read_bytes()
    real = rundir.os.replace

    def killed_before_the_new_name(src, dst):
        if Path(dst).name == rundir.CHECKPOINT:
            raise KeyboardInterrupt  # stands for a kill at this moment
        real(src, dst)
    monkeypatch.setattr(rundir.os, "replace", killed_before_the_new_name)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_checkpoint(torch.load(run / rundir.CHECKPOINT, weights_only=True) | {"batch": 2}, run)
    monkeypatch.undo()
    assert (run / rundir.CHECKPOINT).read_bytes() == before == (run / rundir.PREVIOUS).read_bytes()
    (run / "checkpoint.ptabc123.tmp").write_bytes(b"a write a kill cut short")  # as mkstemp names it
    train(TrainConfig(**SMALL), run, resume=True, progress="none")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "host.json", "log.jsonl",
                                                    "metrics.json"]


def test_run_files_are_readable_by_others(tmp_path):
    """The atomically written files get the mode a plain open() would (0644 under umask 022), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        train(TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "run", progress="none")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert modes == dict.fromkeys(["checkpoint.pt", "config.json", "host.json", "log.jsonl", "metrics.json"], 0o644)


def test_claim_restarts_a_run_that_kept_nothing_and_refuses_a_second_trainer(tmp_path, capsys):
    """A run killed in its first epoch (config.json, no checkpoint) starts again with the same command; a run
    directory another process is training (it holds the directory's lock) is refused in one line; so is a file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig(**SMALL).to_dict()))
    (run / "log.jsonl").write_text("")
    argv = ["train", "--model", "mlp_tanh", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--progress", "none", "--out", run]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "stopped before its first checkpoint and kept nothing; starting it again" in err, err
    assert [r["epoch"] for r in rundir.read_log(run)] == [1]
    fd = os.open(run, os.O_RDONLY)  # another trainer: the lock is per open file, so this process conflicts too
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = run_cli(capsys, "train", "--resume", run)
        assert code == 2 and err == f"lwat: error: {run}: another process is training this run now\n"
    finally:
        os.close(fd)
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        code, _, err = run_cli(capsys, *argv[:-1], out)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(tmp_path / "afile") in err, err


def test_interrupt_before_training_starts_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the data loads (before training's own handler): one line, exit 130, no directory left."""
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr("lwat.train.load_data", interrupted)
    code, _, err = run_cli(capsys, "train", "--model", "mlp_tanh", "--dataset", "synthetic", "--device", "cpu",
                           "--out", tmp_path / "run")
    assert (code, err) == (130, "lwat: interrupted\n") and not (tmp_path / "run").exists()


def test_resume_after_an_epochs_last_step_warns_nothing(tmp_path, recwarn):
    """Stopped right after an epoch's last step, the resumed process steps the lr schedule before any optimizer
    step: torch's 'lr_scheduler.step() before optimizer.step()' warning would be noise there (the lrs are right)."""
    run = tmp_path / "run"
    train(TrainConfig(**SMALL), run, progress="none", stop_after_steps=8)  # 8 steps an epoch
    train(TrainConfig(**SMALL), run, resume=True, progress="none")
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    assert [r["epoch"] for r in rundir.read_log(run)] == [1, 2]


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (OSError ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_disk_at_save(monkeypatch, save_number):
    """torch.save's `save_number`-th call (from 1) meets a full disk after 1000 bytes."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        return real(obj, FullDisk(f, 1000) if len(calls) == save_number else f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("save_number, kept", [(2, True), (1, False)])
def test_full_disk_at_a_checkpoint_is_one_line_exit_2_and_resume_works(save_number, kept, tmp_path, capsys,
                                                                       monkeypatch):
    """A full disk while the checkpoint is written: one line naming the run directory and the space it needs, exit
    2; the previous checkpoint survives and --resume goes on from it (with none yet, the same command starts again)."""
    run = tmp_path / "run"
    argv = ["train", "--model", "mlp_tanh", "--dataset", "synthetic", "--epochs", "3", "--batch-size", "64",
            "--device", "cpu", "--progress", "none", "--out", run]
    fill_disk_at_save(monkeypatch, save_number)  # the checkpoint of epoch 2 (or 1)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lwat: error: {run}: no space left") and re.search(r"needs about [\d.]+ MB", err), err
    monkeypatch.undo()
    if kept:
        assert "is kept" in err and f"lwat train --resume {run}" in err, err
        assert torch.load(run / rundir.CHECKPOINT, weights_only=True)["epoch"] == 1
        code, _, err = run_cli(capsys, "train", "--resume", run, "--progress", "none")
    else:
        assert "nothing was kept" in err and not rundir.has_checkpoint(run), err
        code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert [r["epoch"] for r in rundir.read_log(run)] == [1, 2, 3]
    assert not list(run.glob("*.tmp"))


COMMITTED = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "results").rglob(rundir.CONFIG))


@pytest.mark.skipif(not COMMITTED, reason="no committed runs under results/")
def test_every_committed_run_reads():
    """Every run directory committed under results/ (results/*/runs/* and deeper) still reads with this lwat."""
    for run in COMMITTED:
        view = rundir.read_run(run)
        assert isinstance(view.config, TrainConfig), run
        assert [r["epoch"] for r in view.log] == list(range(1, len(view.log) + 1)), run
        if view.finished:
            assert view.metrics["status"] == "finished" and view.metrics["epochs"] == len(view.log), run
