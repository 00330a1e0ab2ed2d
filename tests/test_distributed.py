"""Tests of DDP training under torchrun: 2 CPU processes (gloo) stay in sync, keep their own caches, resume exactly.

One torchrun launch runs this file as its worker script (`python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py OUT PORT`); each rank trains through `lwat.train.train` in a process group the worker
made (several runs in one process), then through `lwat.cli.main`, which joins torchrun's group itself exactly as
`torchrun -m lwat train` does, and dumps its own model and cache to OUT/dumps (test-only files) for the checks.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lwat.config import ConfigError, TrainConfig
from lwat.rundir import CHECKPOINT, read_log
from lwat.train import train

# lat on a small VGG: 80 synthetic images, 8 per rank and step, so 5 global batches of 16 per epoch.
LAT = dict(model="vgg16_bn", width=0.125, dataset="synthetic", train_subset=80, batch_size=8, epochs=2,
           eval_batch_size=64, lr_drop_every=1, crop=True, flip=True, method="lat", device="cpu")
# fgsm on an MLP without BatchNorm: 2 ranks x 16 images equal one process x 32 (DDP averages the gradients).
FGSM = dict(model="mlp_tanh", dataset="digits", train_subset=320, batch_size=16, epochs=1, method="fgsm",
            lr=0.05, device="cpu", crop=False)
# lat under torch.compile (backend aot_eager in the worker: the same dynamo and autograd tracing, no C++ build)
COMPILED = dict(model="mlp_tanh", dataset="digits", train_subset=320, batch_size=16, epochs=1, method="lat",
                lr=0.05, device="cpu", crop=False, compile=True)
CLI = ["train", "--model", "vgg16_bn", "--width", "0.125", "--dataset", "synthetic", "--train-subset", "80",
       "--batch-size", "8", "--epochs", "1", "--method", "fgsm-inter", "--amp", "bf16", "--channels-last",
       "--device", "cpu", "--progress", "none"]


def worker(out: Path, port: int) -> None:
    import torch.distributed as dist

    import lwat.cli
    import lwat.train

    rank = int(os.environ["RANK"])
    built = {}
    real_build = lwat.train.build

    def build(*args, **kwargs):  # keep this rank's model and handle to dump them after training
        built["model"], built["handle"] = real_build(*args, **kwargs)
        return built["model"], built["handle"]

    lwat.train.build = build
    real_make_ema = lwat.train.make_ema

    def make_ema(*args, **kwargs):  # and its moving average
        built["ema"] = real_make_ema(*args, **kwargs)
        return built["ema"]

    lwat.train.make_ema = make_ema
    dumps = out / "dumps"

    def dump(name, result):
        model, handle, ema = built["model"], built["handle"], built.pop("ema", None)
        torch.save({"model": model.state_dict(), "params": {k: p.detach() for k, p in model.named_parameters()},
                    "cache": handle.state_dict() if handle is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "result": json.loads(json.dumps(result))},  # plain types (metrics hold torch's version object)
                   dumps / f"{name}-{rank}.pt")

    # A group of our own, with its own store: a default group made again on torchrun's store would read the
    # previous group's addresses there.
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    cfg = TrainConfig(**LAT)
    dump("full", train(cfg, out / "full", progress="none"))
    dump("stopped", train(cfg, out / "resumed", progress="none", stop_after_steps=3))  # epoch 1, batch 3 of 5
    dump("resumed", train(cfg, out / "resumed", resume=True, progress="none"))
    dump("ema", train(cfg.replace(ema=0.5), out / "ema", progress="none"))
    dump("fgsm", train(TrainConfig(**FGSM), out / "fgsm", progress="none"))
    compile_ = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kw: compile_(self, backend="aot_eager", **kw)
    dump("compiled", train(TrainConfig(**COMPILED), out / "compiled", progress="none"))
    dist.destroy_process_group()
    dump("cli", lwat.cli.main(CLI + ["--out", str(out / "cli")]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    (out / "dumps").mkdir()
    port, worker_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, str(out), str(worker_port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def free_port() -> int:
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(out, name):
    return [torch.load(out / "dumps" / f"{name}-{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_ranks_stay_in_sync_with_their_own_caches(runs):
    for name in ("full", "stopped", "resumed", "fgsm", "compiled", "cli"):
        rank0, rank1 = load(runs, name)
        # Weights always; BatchNorm statistics at an epoch end (mid-epoch, DDP broadcasts rank 0's at each forward).
        state = "params" if name == "stopped" else "model"
        for key, value in rank0[state].items():
            assert torch.equal(value, rank1[state][key]), (name, key)
        assert rank0["result"] == rank1["result"], name
    for name, cfg in (("full", LAT), ("compiled", COMPILED)):
        rank0, rank1 = load(runs, name)
        for point, cache in rank0["cache"].items():  # each rank perturbs with its own previous batch
            assert cache["signs"].shape[0] == cfg["batch_size"]
            assert not torch.equal(cache["signs"], rank1["cache"][point]["signs"]), (name, point)


def test_ranks_test_one_moving_average_the_one_saved(runs):
    # Each rank's average follows its own BatchNorm statistics during an epoch; at its end every rank must test (and
    # go on from) rank 0's, the one the checkpoint keeps and lwat eval reads.
    saved = torch.load(runs / "ema" / CHECKPOINT, weights_only=True)["ema"]
    for rank, dumped in enumerate(load(runs, "ema")):
        for key, value in saved.items():
            assert torch.equal(dumped["ema"][key], value), (rank, key)


def test_rank0_writes_the_run_and_metrics_are_global(runs):
    log = read_log(runs / "full")
    assert [r["epoch"] for r in log] == [1, 2]  # one writer: one line per epoch
    metrics = json.loads((runs / "full" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics == load(runs, "full")[0]["result"]
    assert log[0]["images_per_s"] * log[0]["seconds"] == pytest.approx(80)  # both ranks' images counted
    assert sorted(p.name for p in (runs / "cli").iterdir()) == ["checkpoint.pt", "config.json", "host.json",
                                                                  "log.jsonl", "metrics.json"]
    assert load(runs, "cli")[0]["result"] == 0


def test_resume_is_exact_with_every_ranks_cache(runs):
    full, resumed = load(runs, "full"), load(runs, "resumed")
    for rank in (0, 1):
        for key, value in full[rank]["model"].items():
            assert torch.equal(value, resumed[rank]["model"][key]), (rank, key)
        for point, cache in full[rank]["cache"].items():
            assert torch.equal(cache["signs"], resumed[rank]["cache"][point]["signs"]), (rank, point)
            assert torch.equal(cache["scale"], resumed[rank]["cache"][point]["scale"]), (rank, point)
    keys = ("train_loss", "train_acc", "test_acc")
    for r1, r2 in zip(read_log(runs / "full"), read_log(runs / "resumed"), strict=True):
        assert [r1[k] for k in keys] == [r2[k] for k in keys]
    ckpt = torch.load(runs / "resumed" / CHECKPOINT, weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    for rank in (0, 1):
        for point, cache in full[rank]["cache"].items():
            assert torch.equal(ckpt["ranks"][rank]["perturbation"][point]["signs"], cache["signs"])


def test_two_ranks_equal_one_process_with_the_global_batch(runs, tmp_path):
    cfg = TrainConfig(**{**FGSM, "batch_size": 2 * FGSM["batch_size"]})
    train(cfg, tmp_path / "one", progress="none")
    one = torch.load(tmp_path / "one" / CHECKPOINT, weights_only=True)["model"]
    two = load(runs, "fgsm")[0]["model"]
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6)


def test_resume_with_another_number_of_processes_only_at_an_epoch_end(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    (run / "metrics.json").unlink()
    torch.save({**ckpt, "epoch": 1, "batch": 2}, run / CHECKPOINT)
    with pytest.raises(ConfigError, match="written mid-epoch by 2 process.*not 1"):
        train(TrainConfig(**LAT), run, resume=True, progress="none")
    torch.save({**ckpt, "epoch": 1, "batch": 0}, run / CHECKPOINT)  # at an epoch end: rank 0's state goes on
    assert train(TrainConfig(**LAT), run, resume=True, progress="none")["world_size"] == 1


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
