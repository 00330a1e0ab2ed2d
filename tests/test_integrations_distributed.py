"""Tests of lwat with 2 CPU processes (gloo): the Lightning callback under strategy="ddp", and a model with
points under FSDP2 (`torch.distributed.fsdp.fully_shard`).

One torchrun launch runs this file as its worker script; each rank records every step (batch, weights and cache
before, cache after) into OUT/dumps, and the tests check each rank's caches against the hand reference.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning.pytorch")

from test_integrations import assert_same_cache, clone_cache, reference_cache  # noqa: E402
from test_integrations_lightning import EPS, Net, Recorder, check_batches, loader, trainer  # noqa: E402

import lwat  # noqa: E402
from lwat.integrations.lightning import LayerwiseAdversarialTraining  # noqa: E402

FSDP_POINTS = ["0.ln", "1.fc", "1.ln"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return x + self.ln(torch.tanh(self.fc(x)))


def blocks():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(8, 3))


def worker(out: Path) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])

    def dump(name, obj):
        torch.save(obj, out / "dumps" / f"{name}-{rank}.pt")

    # Lightning, strategy="ddp": 32 samples, each rank gets 16 (its own) in 4 batches of 4.
    ddp = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "use_distributed_sampler": True}
    lat = LayerwiseAdversarialTraining(EPS, points=["net.1", "net.4"])
    record = Recorder(lat)
    t = trainer([lat, record], max_epochs=1, **ddp)
    t.fit(Net(), loader(batch_size=4))
    t.save_checkpoint(out / "ddp.ckpt")  # every rank takes part; rank 0 writes every rank's cache
    lat2 = LayerwiseAdversarialTraining(EPS, points=["net.1", "net.4"])
    record2 = Recorder(lat2)
    trainer([lat2, record2], max_epochs=2, **ddp).fit(Net(seed=5), loader(batch_size=4), ckpt_path=out / "ddp.ckpt")
    dump("ddp", {"batches": record.batches, "last": lat.state_dict()["ranks"][rank]["perturbation"],
                 "resumed_before": record2.batches[0]["before"]})

    # FSDP2 on the same 2-process group.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2,))

    def fsdp_run(attach_first: bool, shard_points: bool):
        model = blocks()
        units = [model[1].ln] if shard_points else []  # a point that is itself a unit: sharded before its block
        if attach_first:
            handle = lwat.attach(model, EPS, points=FSDP_POINTS)
        for unit in [*units, model[0], model[1], model]:
            fully_shard(unit, mesh=mesh)
        if not attach_first:
            handle = lwat.attach(model, EPS, points=FSDP_POINTS)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        steps = []
        for _ in range(3):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            weights = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                       for k, v in model.state_dict().items()}
            before = clone_cache(handle.state_dict())
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append({"batch": (x, y), "weights": weights, "before": before,
                          "after": clone_cache(handle.state_dict())})
        try:
            handle.detach()
            detached = None
        except (RuntimeError, ValueError) as e:
            detached = str(e)
        classes = {n: {"name": type(model.get_submodule(n)).__name__,
                       "fsdp": isinstance(model.get_submodule(n), FSDPModule),
                       "point": hasattr(model.get_submodule(n), "_lwat")} for n in FSDP_POINTS}
        return {"steps": steps, "detach_error": detached, "classes": classes}, model

    after, model = fsdp_run(attach_first=False, shard_points=True)
    x = torch.randn(4, 8)
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()  # the detached model still trains
    after["plain_step"] = True
    dump("fsdp-attach-after", after)
    dump("fsdp-attach-before", fsdp_run(attach_first=True, shard_points=False)[0])
    dump("fsdp-point-sharded-after-attach", fsdp_run(attach_first=True, shard_points=True)[0])
    dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_distributed import free_port

    out = tmp_path_factory.mktemp("dist")
    (out / "dumps").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def load(out, name):
    return [torch.load(out / "dumps" / f"{name}-{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_lightning_ddp_each_rank_caches_its_own_batchs_gradient(runs):
    ranks = load(runs, "ddp")
    for rank in ranks:
        assert len(rank["batches"]) == 4
        check_batches(rank["batches"], ["net.1", "net.4"])
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert not torch.equal(b0["batch"][0], b1["batch"][0])  # each rank its own data
        for key, value in b0["weights"].items():  # one model: DDP keeps the weights in sync
            assert torch.equal(value, b1["weights"][key]), key
        for point, cache in b0["after"].items():  # and each rank its own cache
            assert not torch.equal(cache["signs"], b1["after"][point]["signs"]), point


def test_lightning_ddp_checkpoint_holds_every_ranks_cache_and_resume_gives_each_its_own(runs):
    ranks = load(runs, "ddp")
    saved = torch.load(runs / "ddp.ckpt", weights_only=True)["callbacks"]["LayerwiseAdversarialTraining"]
    assert saved["world_size"] == 2 and sorted(saved["ranks"]) == [0, 1]
    for r, rank in enumerate(ranks):
        assert_same_cache(rank["last"], rank["batches"][-1]["after"])
        assert_same_cache(saved["ranks"][r]["perturbation"], rank["last"])
        assert_same_cache(rank["resumed_before"], rank["last"])  # the cache after resume is this rank's saved one


def check_fsdp_steps(ranks):
    for rank in ranks:
        for i, step in enumerate(rank["steps"]):
            if i:
                assert_same_cache(step["before"], rank["steps"][i - 1]["after"])
            plain = blocks()
            plain.load_state_dict(step["weights"])
            x, y = step["batch"]
            want = reference_cache(plain, FSDP_POINTS, step["before"], EPS, lambda m: F.cross_entropy(m(x), y))
            assert_same_cache(step["after"], want)
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        for key, value in s0["weights"].items():
            assert torch.equal(value, s1["weights"][key]), key
        for point, cache in s0["after"].items():
            assert not torch.equal(cache["signs"], s1["after"][point]["signs"]), point


def test_fsdp2_attach_after_fully_shard_caches_each_ranks_gradient_and_detaches_to_the_sharded_model(runs):
    ranks = load(runs, "fsdp-attach-after")
    check_fsdp_steps(ranks)
    for rank in ranks:
        assert rank["detach_error"] is None and rank["plain_step"]
        assert rank["classes"]["1.ln"] == {"name": "FSDPLayerNorm", "fsdp": True, "point": False}
        assert rank["classes"]["0.ln"] == {"name": "LayerNorm", "fsdp": False, "point": False}


def test_fsdp2_attach_before_fully_shard_with_points_inside_units(runs):
    ranks, after = load(runs, "fsdp-attach-before"), load(runs, "fsdp-attach-after")
    check_fsdp_steps(ranks)
    for rank, other in zip(ranks, after):  # the same steps as attaching after sharding
        assert_same_cache(rank["steps"][-1]["after"], other["steps"][-1]["after"])
        assert rank["detach_error"] is None
        assert all(c["name"] in ("LayerNorm", "Linear") and not c["point"] for c in rank["classes"].values())


def test_fsdp2_detach_of_a_point_that_fully_shard_wrapped_after_attach(runs):
    ranks = load(runs, "fsdp-point-sharded-after-attach")
    check_fsdp_steps(ranks)  # training itself is right
    for rank in ranks:  # detach must give back the sharded plain module, or refuse clearly
        if rank["detach_error"] is None:
            assert rank["classes"]["1.ln"] == {"name": "FSDPLayerNorm", "fsdp": True, "point": False}
        else:
            assert "1.ln" in rank["detach_error"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
