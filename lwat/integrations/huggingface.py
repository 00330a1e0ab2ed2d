"""Layerwise adversarial training in the Hugging Face Trainer: `Trainer(..., callbacks=[LayerwiseAdversarialCallback(10)])`."""

from __future__ import annotations

import json
import os
import warnings

import torch

from lwat.integrations._shared import Attachment, framework

with framework("huggingface"):
    from transformers import TrainerCallback
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

CACHE_FILE = "lwat-cache-rank{rank}.pt"  # in each checkpoint folder, one per process


class LayerwiseAdversarialCallback(TrainerCallback):
    """Attaches lwat to the Trainer's model at train begin and keeps its cache in the Trainer's checkpoints.

    Args:
        eps, scale, points, depth, direction, kernels: as for `lwat.attach`, passed unchanged; point names are those
            inside the attached module. Checked here, with attach's messages, as far as they do not depend on the
            model (a ValueError); point names, depth and `module` against the model when training starts.
        module: attach to this submodule of the model (dotted name, e.g. "bert"), not to the whole model.

    While training, `.handle` is the `lwat.Handle`; when training ends, the model is the plain model again
    (`save_pretrained` writes the plain architecture's files either way: attaching changes no state_dict key).

    Checkpoints: each process writes its cache as `lwat-cache-rank<r>.pt` into each `checkpoint-<step>` folder.
    When training resumes (the Trainer's state says step > 0), each process reloads its own from
    `args.resume_from_checkpoint` if that folder is the checkpoint of this step, else from
    `<output_dir>/checkpoint-<step>` (the folder that `train(resume_from_checkpoint=True)` picks;
    `train(resume_from_checkpoint=PATH)` does not tell callbacks PATH: set `args.resume_from_checkpoint` too for
    a checkpoint elsewhere); when it finds none, it warns and starts without a cache.
    fp16: before each step the handle gets the loss scale of accelerate's GradScaler, so eps_l comes from the
    unscaled gradient (DeepSpeed's own fp16 loss scale is not readable: fp16 with DeepSpeed is refused).
    """

    def __init__(self, eps, *, scale: str = "range", points=None, depth: int | None = None,
                 direction: str = "gradient", kernels: str = "aten", module: str | None = None):
        self._lwat = Attachment(eps, scale=scale, points=points, depth=depth, direction=direction, kernels=kernels,
                                module=module)
        self._scaler = None  # the prepared optimizer's GradScaler (fp16), else None

    @property
    def handle(self):
        """The live `lwat.Handle` while training, else None."""
        return self._lwat.handle

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.fp16 and args.deepspeed:
            raise ValueError("lwat: fp16 under DeepSpeed scales the loss where this callback cannot read the "
                             "scale (eps_l would be off by it); use bf16 or fp32")
        self._lwat.attach(model)
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds it
        if state.global_step > 0:  # resuming: the Trainer loaded the state of checkpoint-<global_step>
            folder = _resumed_folder(args, state)
            path = os.path.join(folder, CACHE_FILE.format(rank=args.process_index))
            if not os.path.isfile(path):
                warnings.warn(f"lwat: no perturbation cache {path}; the first batch after resuming is not "
                              "perturbed", stacklevel=2)
                return
            self._lwat.restore(torch.load(path, weights_only=True), args.process_index, args.world_size)

    def on_step_begin(self, args, state, control, **kwargs):
        # The scale changes only in the optimizer step (scaler.update), so this one holds for the step's backwards.
        self._lwat.set_loss_scale(self._scaler, args.device)

    def on_save(self, args, state, control, **kwargs):
        folder = _checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            raise RuntimeError(f"lwat: the Trainer's checkpoint folder {folder} is not there (hyperparameter "
                               "search runs are not supported)")
        path = os.path.join(folder, CACHE_FILE.format(rank=args.process_index))
        torch.save(self._lwat.saved(args.process_index, args.world_size), path + ".tmp")
        os.replace(path + ".tmp", path)

    def on_train_end(self, args, state, control, **kwargs):
        self._lwat.detach()


def _checkpoint_folder(args, state) -> str:
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _resumed_folder(args, state) -> str:
    # The checkpoint the Trainer resumed from: args.resume_from_checkpoint if it holds this step (a value set in
    # TrainingArguments may be stale; `train(resume_from_checkpoint=PATH)` does not set it, transformers 5.24),
    # else <output_dir>/checkpoint-<step>.
    given = args.resume_from_checkpoint
    try:
        with open(os.path.join(given, TRAINER_STATE_NAME)) as f:
            if json.load(f).get("global_step") == state.global_step:
                return given
    except (TypeError, OSError, ValueError):  # not set, no trainer_state.json, or not JSON
        pass
    return _checkpoint_folder(args, state)
