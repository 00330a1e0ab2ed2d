"""Layerwise adversarial training in Lightning: `Trainer(callbacks=[LayerwiseAdversarialTraining(eps=10)])`."""

from __future__ import annotations

import torch.distributed as dist

from lwat.integrations._shared import Attachment, framework

with framework("lightning"):
    from lightning.pytorch.callbacks import Callback


class LayerwiseAdversarialTraining(Callback):
    """Attaches lwat to the LightningModule when fitting starts and keeps its cache in Lightning's checkpoints.

    Args:
        eps, scale, points, depth, direction, kernels: as for `lwat.attach`, passed unchanged; point names are those
            inside the attached module. Checked here, with attach's messages, as far as they do not depend on the
            model (a ValueError); point names, depth and `module` against the model when training starts.
        module: attach to this submodule of the LightningModule (its attribute name, dotted for a nested one,
            e.g. "model"), not to the whole LightningModule.

    While fitting, `.handle` is the `lwat.Handle` (e.g. `callback.handle.paused()` for a clean pass of a joint
    loss in `training_step`); when `fit` ends (or raises), the model is the plain model again and `.handle` is None.

    Checkpoints: the callback's state is every process's cache, gathered when a checkpoint is written (also by
    `trainer.save_checkpoint` after `fit`: the last cache), so `trainer.fit(model, ckpt_path=...)` resumes each
    process with its own cache. With another number of processes it warns and starts without a cache.
    fp16 ("16-mixed"): before each backward the handle gets the GradScaler's loss scale, so eps_l comes from the
    unscaled gradient.
    """

    def __init__(self, eps, *, scale: str = "range", points=None, depth: int | None = None,
                 direction: str = "gradient", kernels: str = "aten", module: str | None = None):
        self._lwat = Attachment(eps, scale=scale, points=points, depth=depth, direction=direction, kernels=kernels,
                                module=module)
        self._rank, self._world_size = 0, 1
        self._scaler = None  # the precision plugin's GradScaler ("16-mixed"), else None
        self._to_restore = None  # a checkpoint's state, loaded by Lightning before on_fit_start

    @property
    def handle(self):
        """The live `lwat.Handle` while fitting, else None."""
        return self._lwat.handle

    def on_fit_start(self, trainer, pl_module) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._lwat.attach(pl_module)
        self._restore()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._lwat.set_loss_scale(self._scaler, loss.device)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._lwat.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._lwat.detach()

    def state_dict(self) -> dict:
        # Called on every process when a checkpoint is written (rank 0 writes it): gather every rank's cache.
        saved = self._lwat.saved(self._rank, self._world_size)
        if self._world_size > 1:
            gathered = [None] * self._world_size
            dist.all_gather_object(gathered, saved["ranks"])
            saved["ranks"] = {rank: cache for ranks in gathered for rank, cache in ranks.items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict
        self._restore()  # strategies that restore checkpoints after setup call this after on_fit_start

    def _restore(self) -> None:
        if self._to_restore is not None and self._lwat.handle is not None:
            self._lwat.restore(self._to_restore, self._rank, self._world_size)
            self._to_restore = None
