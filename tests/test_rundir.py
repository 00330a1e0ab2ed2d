"""Tests of lwat.rundir: the previous checkpoint kept, damaged checkpoints as one-line errors, provenance in host.json."""

import hashlib
import json
import re
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


def test_evaluate_run_keeps_a_finished_runs_other_eps(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**SMALL), run, progress="none")
    first = rundir.evaluate_run(run, eps_list=(0.0, 0.1), device="cpu")
    second = rundir.evaluate_run(run, eps_list=(0.05,), device="cpu")
    assert set(first["accuracy"]) == {"0", "0.1"} and set(second["accuracy"]) == {"0.05"}
    stored = json.loads((run / rundir.EVAL).read_text())
    assert stored["accuracy"] == {**first["accuracy"], **second["accuracy"]}


def test_read_run_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="not a run directory"):
        rundir.read_run(tmp_path)
    run = interrupted_run(tmp_path / "run")
    view = rundir.read_run(run)
    assert not view.finished and view.has_checkpoint and [r["epoch"] for r in view.log] == [1]
