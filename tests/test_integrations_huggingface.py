"""Tests of lwat.integrations.huggingface with a real Trainer on a tiny random-weight BERT (nothing downloaded):
every step's cache against a hand reference, checkpoints hold the cache and load as the plain model, resume,
a GradScaler's loss scale."""

import copy
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: the model comes from a config
transformers = pytest.importorskip("transformers")

from test_integrations import assert_same_cache, clone_cache, reference_cache  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

from lwat.integrations.huggingface import LayerwiseAdversarialCallback  # noqa: E402

EPS = 20.0
# No dropout, so a step can be recomputed exactly by hand.
CONFIG = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=8, num_labels=2, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)


def bert(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(CONFIG)


LAYERNORMS = [name for name, m in bert().named_modules() if isinstance(m, nn.LayerNorm)]


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.ids, self.labels = torch.randint(0, 32, (n, 8), generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer(out, model, callbacks, **kwargs):
    kwargs = {"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 0.05, "save_strategy": "steps",
              "save_steps": 2, "logging_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True,
              "seed": 0, **kwargs}
    args = TrainingArguments(output_dir=str(out), **kwargs)
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


class Recorder(TrainerCallback):
    """Per step: the inputs, the weights and the cache before its forward, the loss scale, the cache after."""

    def __init__(self, lat, model):
        self.lat, self.model, self.steps = lat, model, []
        self.scaler = None
        model.register_forward_pre_hook(self.before, with_kwargs=True)

    def before(self, module, args, kwargs):
        if module.training:
            self.steps.append({"inputs": {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                               "weights": copy.deepcopy(module.state_dict()),
                               "before": clone_cache(self.lat.handle.state_dict()),
                               "loss_scale": self.scaler.get_scale() if self.scaler is not None else 1.0,
                               "kernels": self.lat.handle.kernels})

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.scaler = getattr(optimizer, "scaler", None)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[-1]["after"] = clone_cache(self.lat.handle.state_dict())

    on_substep_end = on_step_end  # a micro-batch's backward under gradient accumulation


def check_steps(steps, points, module=None, divide=1):
    """Each step's new cache is Algorithm 1's step on its batch, from the weights and cache before it.

    `divide`: what the Trainer divided each micro-batch's loss by before its backward (gradient accumulation).
    """
    for i, s in enumerate(steps):
        if i:
            assert_same_cache(s["before"], steps[i - 1]["after"])  # micro-batch i uses micro-batch i-1's signs
        plain = bert()
        plain.load_state_dict(s["weights"])
        target = plain.get_submodule(module) if module else plain
        want = reference_cache(target, points, s["before"], EPS, lambda _: plain(**s["inputs"]).loss / divide,
                               loss_scale=s["loss_scale"])
        assert_same_cache(s["after"], want)


def saved_cache(folder):
    saved = torch.load(folder / "lwat-cache-rank0.pt", weights_only=True)
    assert saved["world_size"] == 1
    return saved["ranks"][0]["perturbation"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps with points after every LayerNorm, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("hf")
    model = bert()
    lat = LayerwiseAdversarialCallback(EPS, points=LAYERNORMS)
    record = Recorder(lat, model)
    trainer(out, model, [lat, record]).train()
    return SimpleNamespace(out=out, model=model, lat=lat, steps=record.steps)


def test_every_step_caches_its_own_gradient_signs(run):
    assert len(run.steps) == 4
    assert all(e["signs"] is None for e in run.steps[0]["before"].values())  # nothing cached before step 1
    check_steps(run.steps, LAYERNORMS)


def test_checkpoints_hold_the_cache_and_load_as_the_plain_model(run):
    assert_same_cache(saved_cache(run.out / "checkpoint-2"), run.steps[1]["after"])
    assert_same_cache(saved_cache(run.out / "checkpoint-4"), run.steps[3]["after"])
    assert run.lat.handle is None  # detached when training ended
    assert all(type(m) is nn.LayerNorm for name, m in run.model.named_modules() if name in LAYERNORMS)
    loaded = BertForSequenceClassification.from_pretrained(run.out / "checkpoint-4")
    assert type(loaded) is BertForSequenceClassification
    assert all(type(m) is nn.LayerNorm for name, m in loaded.named_modules() if name in LAYERNORMS)
    for key, value in run.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = Tokens().ids
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, run.model.eval()(input_ids=ids).logits)


def test_resume_reloads_the_cache_and_equals_the_uninterrupted_run(run, tmp_path):
    """The cache comes from the checkpoint of the step resumed at, even with a stale args.resume_from_checkpoint
    (here checkpoint-4 of the first run, set in TrainingArguments, while train(resume_from_checkpoint=True) resumes
    from <output_dir>/checkpoint-2)."""
    shutil.copytree(run.out / "checkpoint-2", tmp_path / "checkpoint-2")
    model = bert(seed=7)
    lat = LayerwiseAdversarialCallback(EPS, points=LAYERNORMS)
    record = Recorder(lat, model)
    stale = str(run.out / "checkpoint-4")
    trainer(tmp_path, model, [lat, record], resume_from_checkpoint=stale).train(resume_from_checkpoint=True)
    assert len(record.steps) == 2  # steps 3 and 4
    assert_same_cache(record.steps[0]["before"], saved_cache(run.out / "checkpoint-2"))
    assert_same_cache(saved_cache(tmp_path / "checkpoint-4"), saved_cache(run.out / "checkpoint-4"))
    for key, value in run.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_resume_from_a_checkpoint_without_a_cache_warns(run, tmp_path):
    shutil.copytree(run.out / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "lwat-cache-rank0.pt").unlink()
    lat = LayerwiseAdversarialCallback(EPS, points=LAYERNORMS)
    with pytest.warns(UserWarning, match="no perturbation cache .*checkpoint-2.*not perturbed"):
        trainer(tmp_path, bert(), [lat], save_strategy="no").train(resume_from_checkpoint=True)


def test_a_grad_scalers_loss_scale_is_taken_out_of_eps_l(tmp_path):
    # No fp16 GradScaler on CPU in accelerate, so the Accelerator is given the one it makes on a GPU for fp16 (here
    # in fp32): the loss is scaled by 2**10 in backward and unscaled before the step, exactly as under fp16.
    model = bert()
    points = [name.removeprefix("bert.") for name in LAYERNORMS if name.startswith("bert.")]
    lat = LayerwiseAdversarialCallback(EPS, points=points, module="bert")
    record = Recorder(lat, model)
    t = trainer(tmp_path, model, [lat, record], max_steps=2, save_strategy="no")
    t.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    t.train()
    assert [s["loss_scale"] for s in record.steps] == [2.0 ** 10] * 2  # the loss really was scaled
    check_steps(record.steps, points, module="bert")


def test_gradient_accumulation_perturbs_each_micro_batch_with_the_previous_ones_signs(tmp_path):
    model = bert()
    lat = LayerwiseAdversarialCallback(EPS, points=LAYERNORMS)
    record = Recorder(lat, model)
    t = trainer(tmp_path, model, [lat, record], max_steps=2, gradient_accumulation_steps=2, save_strategy="no")
    t.train()
    assert len(record.steps) == 4
    # The Trainer divides a micro-batch's loss by their number only for models that take no loss kwargs; a model
    # that takes them (BERT in transformers 5) is trusted to normalize by num_items_in_batch, which BERT's
    # sequence classification loss ignores: there dJ/da, hence eps_l, is that of a micro-batch's mean loss.
    check_steps(record.steps, LAYERNORMS, divide=1 if t.model_accepts_loss_kwargs else 2)


def test_fp16_under_deepspeed_is_refused():
    lat = LayerwiseAdversarialCallback(EPS)
    args = SimpleNamespace(fp16=True, deepspeed="ds_config.json")
    with pytest.raises(ValueError, match="fp16 under DeepSpeed"):
        lat.on_train_begin(args, SimpleNamespace(global_step=0), None, model=bert())
    assert lat.handle is None


def test_points_by_class_and_kernels_pass_through(tmp_path):
    model = bert()
    lat = LayerwiseAdversarialCallback(EPS, points=nn.LayerNorm, kernels="fused")
    record = Recorder(lat, model)
    trainer(tmp_path, model, [lat, record], max_steps=2, save_strategy="no").train()
    assert sorted(record.steps[-1]["after"]) == sorted(LAYERNORMS)
    assert [s["kernels"] for s in record.steps] == ["fused", "fused"]
    check_steps(record.steps, LAYERNORMS)
