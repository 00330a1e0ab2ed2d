"""Tests of lwat.integrations.lightning with real Lightning on CPU: every batch's cache against a hand
reference (plain, gradient accumulation, bf16-mixed, fp16 with a GradScaler), resume, errors, detach."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from test_integrations import assert_same_cache, clone_cache, reference_cache  # noqa: E402

from lwat.integrations.lightning import LayerwiseAdversarialTraining  # noqa: E402

EPS = 20.0  # eps_l ~ the activations' size here: the perturbation changes the next gradient's signs
LAYERNORMS = ["net.1", "net.4"]


class Net(L.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16),
                                 nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def cache_of(saved, rank=0):
    """A process's cache in the callback's saved state (`lwat.cache`'s format)."""
    return saved["ranks"][rank]["perturbation"]


def loader(n=32, batch_size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def trainer(callbacks, **kwargs):
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and loggers
        return L.Trainer(callbacks=callbacks, **kwargs)


class Recorder(L.Callback):
    """Per batch: the batch, the weights and the cache before it, the loss scale, and the cache after it."""

    def __init__(self, lat):
        self.lat, self.batches = lat, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.batches.append({"batch": [t.clone() for t in batch], "weights": copy.deepcopy(pl_module.state_dict()),
                             "before": clone_cache(self.lat.handle.state_dict()),
                             "loss_scale": scaler.get_scale() if scaler is not None else 1.0,
                             "kernels": self.lat.handle.kernels})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches[-1]["after"] = clone_cache(self.lat.handle.state_dict())


def check_batches(batches, points, autocast=None, rtol=None, module=None, accumulate=1):
    """Each batch's new cache is Algorithm 1's step on that batch, from the weights and cache before it.

    Under gradient accumulation Lightning divides each micro-batch's loss by their number: dJ/da, hence eps_l,
    is then the gradient of the mean loss over all micro-batches of the step, as without accumulation.
    """
    for i, b in enumerate(batches):
        if i == 0:
            assert all(e["signs"] is None for e in b["before"].values())  # nothing cached before the first batch
        else:
            assert_same_cache(b["before"], batches[i - 1]["after"])  # micro-batch i uses micro-batch i-1's signs
        plain = Net()
        plain.load_state_dict(b["weights"])
        x, y = b["batch"]
        plain = plain.get_submodule(module) if module else plain  # the module attached to, called as Net calls it
        want = reference_cache(plain, points, b["before"], EPS, lambda m: F.cross_entropy(m(x), y) / accumulate,
                               autocast=autocast, loss_scale=b["loss_scale"])
        assert_same_cache(b["after"], want, rtol=rtol)


CASES = {  # name: (Trainer arguments, callback arguments, points (named in the module attached to), autocast)
    "fp32 default points": ({}, {}, ["net.0", "net.3"], None),
    "accumulate 2, module": ({"accumulate_grad_batches": 2}, {"module": "net", "points": ["1", "4"]}, ["1", "4"],
                             None),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {"points": LAYERNORMS}, LAYERNORMS, torch.bfloat16),
    # Lightning turns precision="16-mixed" on CPU into bf16, so the fp16 plugin is given explicitly: real fp16
    # autocast and a real GradScaler (its default loss scale 2**16), as on a GPU.
    "16-mixed": ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]},
                 {"module": "net"}, ["0", "3"], torch.float16),
}


@pytest.mark.parametrize("case", CASES)
def test_every_batch_caches_its_own_gradient_signs_and_fit_ends_plain(case):
    trainer_args, lat_args, points, autocast = CASES[case]
    model, lat = Net(), LayerwiseAdversarialTraining(EPS, **lat_args)
    record = Recorder(lat)
    trainer([lat, record], max_epochs=1, **trainer_args).fit(model, loader())
    assert len(record.batches) == 4
    if case == "16-mixed":
        assert all(b["loss_scale"] == 2.0 ** 16 for b in record.batches)  # the loss really was scaled
    check_batches(record.batches, points, autocast, rtol=1e-5 if autocast == torch.float16 else None,
                  module=lat_args.get("module"), accumulate=trainer_args.get("accumulate_grad_batches", 1))
    # After fit: the plain model, and the last cache is the callback's state (what a checkpoint would hold).
    assert lat.handle is None
    assert [type(m) for m in model.net] == [nn.Linear, nn.LayerNorm, nn.Tanh, nn.Linear, nn.LayerNorm, nn.Tanh,
                                            nn.Linear]
    assert_same_cache(cache_of(lat.state_dict()), record.batches[-1]["after"])


def test_resumed_fit_restores_the_saved_cache_and_equals_the_uninterrupted_fit(tmp_path):
    full, lat_full = Net(), LayerwiseAdversarialTraining(EPS)
    trainer([lat_full], max_epochs=2).fit(full, loader())

    first, lat = Net(), LayerwiseAdversarialTraining(EPS)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)  # at the epoch's end, mid-fit
    trainer([lat, saver], max_epochs=1, enable_checkpointing=True).fit(first, loader())
    [ckpt] = tmp_path.glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["LayerwiseAdversarialTraining"]
    assert saved["world_size"] == 1
    assert_same_cache(cache_of(saved), cache_of(lat.state_dict()))  # written mid-fit, equals the cache at the end
    assert all(e["signs"] is not None for e in cache_of(saved).values())

    resumed, lat2 = Net(seed=5), LayerwiseAdversarialTraining(EPS)
    record = Recorder(lat2)
    trainer([lat2, record], max_epochs=2).fit(resumed, loader(), ckpt_path=ckpt)
    assert len(record.batches) == 4  # the second epoch only
    assert_same_cache(record.batches[0]["before"], cache_of(saved))  # the cache after resume is the saved one
    assert_same_cache(cache_of(lat2.state_dict()), cache_of(lat_full.state_dict()))
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_checkpoint_from_another_number_of_processes_warns_and_starts_without_a_cache(tmp_path):
    first = Net()
    lat = LayerwiseAdversarialTraining(EPS)
    t = trainer([lat], max_steps=2)
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "last.ckpt")  # after fit: the callback's last cache
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert_same_cache(cache_of(ckpt["callbacks"]["LayerwiseAdversarialTraining"]), cache_of(lat.state_dict()))
    ckpt["callbacks"]["LayerwiseAdversarialTraining"]["world_size"] = 2
    torch.save(ckpt, tmp_path / "two.ckpt")
    lat2 = LayerwiseAdversarialTraining(EPS)
    record = Recorder(lat2)
    with pytest.warns(UserWarning, match="no perturbation cache for process 0 of 1 .*saved by 2"):
        trainer([lat2, record], max_steps=3).fit(Net(), loader(), ckpt_path=tmp_path / "two.ckpt")
    assert all(e["signs"] is None for e in record.batches[0]["before"].values())


def test_a_checkpoint_in_the_callbacks_older_layout_still_resumes(tmp_path):
    """Before lwat.cache the callback saved {"world_size": W, "ranks": {rank: cache}}: such a checkpoint resumes with
    its cache."""
    lat = LayerwiseAdversarialTraining(EPS)
    t = trainer([lat], max_steps=2)
    t.fit(Net(), loader())
    t.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    bare = cache_of(ckpt["callbacks"]["LayerwiseAdversarialTraining"])
    ckpt["callbacks"]["LayerwiseAdversarialTraining"] = {"world_size": 1, "ranks": {0: bare}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    lat2 = LayerwiseAdversarialTraining(EPS)
    record = Recorder(lat2)
    trainer([lat2, record], max_steps=3).fit(Net(), loader(), ckpt_path=tmp_path / "old.ckpt")
    assert len(record.batches) == 1 and all(e["signs"] is not None for e in bare.values())
    assert_same_cache(record.batches[0]["before"], bare)


@pytest.mark.parametrize("args, message", [
    ({"module": "model"}, "module='model': Net has no submodule of that name"),
    ({"points": ["net.9"]}, "no submodule named 'net.9'"),
    ({"depth": 3}, "depth must be in 1..2"),
])
def test_mistakes_are_one_line_errors_and_leave_the_model_plain(args, message):
    model = Net()
    lat = LayerwiseAdversarialTraining(**{"eps": EPS, **args})
    with pytest.raises(ValueError, match=message):
        trainer([lat], max_steps=1).fit(model, loader())
    assert lat.handle is None and [type(m) for m in model.net][:2] == [nn.Linear, nn.LayerNorm]


class Failing(Net):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("data error")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_raises_leaves_the_plain_model_and_its_last_cache():
    model, lat = Failing(), LayerwiseAdversarialTraining(EPS, points=LAYERNORMS)
    record = Recorder(lat)
    with pytest.raises(RuntimeError, match="data error"):
        trainer([lat, record], max_epochs=1).fit(model, loader())
    assert lat.handle is None and [type(m) for m in model.net][:2] == [nn.Linear, nn.LayerNorm]
    assert_same_cache(cache_of(lat.state_dict()), record.batches[1]["after"])


def test_points_by_class_and_kernels_pass_through():
    lat = LayerwiseAdversarialTraining(EPS, points=nn.LayerNorm, kernels="fused")
    record = Recorder(lat)
    trainer([lat, record], max_steps=2).fit(Net(), loader())
    assert sorted(record.batches[-1]["after"]) == LAYERNORMS
    assert [b["kernels"] for b in record.batches] == ["fused", "fused"]
    check_batches(record.batches, LAYERNORMS)
