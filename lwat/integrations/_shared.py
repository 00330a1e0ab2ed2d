"""What the framework callbacks share: attach when training starts, save and restore the cache, pass the loss scale."""

from __future__ import annotations

import warnings
from itertools import chain

import torch
from torch import nn

import lwat


class Attachment:
    """One callback's lwat state over a training run: the `attach` arguments, the live handle, the last cache.

    A saved cache is `{"world_size": W, "ranks": {rank: handle.state_dict() on the CPU}}`: every process perturbs
    with its own previous batch, so each keeps (and resumes) its own cache.
    """

    def __init__(self, eps, *, scale: str, points, depth: int | None, kernels: str, module: str | None):
        self.eps, self.module = eps, module
        self.options = dict(scale=scale, points=points, depth=depth, kernels=kernels)  # to lwat.attach unchanged
        self.handle: lwat.Handle | None = None  # while training
        self.last: dict | None = None  # the cache when training ended: a checkpoint written after it holds this
        self.device = torch.device("cpu")  # where a restored cache goes: the attached module's

    def attach(self, model: nn.Module) -> lwat.Handle:
        """`lwat.attach` to `model`, or to its submodule named `module`."""
        self.detach()  # a run that ended without the framework's end hook (killed) left it attached
        target = model
        if self.module is not None:
            try:
                target = model.get_submodule(self.module)
            except AttributeError:
                raise ValueError(f"module={self.module!r}: {type(model).__name__} has no submodule of that "
                                 "name") from None
        self.handle = lwat.attach(target, self.eps, **self.options)
        self.device = next(chain(target.parameters(), target.buffers()), torch.empty(0)).device
        self.last = None
        return self.handle

    def detach(self) -> None:
        if self.handle is not None:
            self.last = self.handle.state_dict()
            self.handle.detach()
            self.handle = None

    def saved(self, rank: int, world_size: int) -> dict:
        """This process's cache (live, or the last one) in the saved form, on the CPU."""
        cache = self.handle.state_dict() if self.handle is not None else self.last
        if cache is not None:
            cache = {point: {k: None if v is None else v.detach().cpu() for k, v in entry.items()}
                     for point, entry in cache.items()}
        return {"world_size": world_size, "ranks": {rank: cache}}

    def restore(self, saved: dict, rank: int, world_size: int) -> None:
        """Load this process's cache from `saved` into the live handle (the next train pass is perturbed with it)."""
        if saved["world_size"] != world_size or rank not in saved["ranks"]:
            warnings.warn(f"lwat: no perturbation cache for process {rank} of {world_size} in the checkpoint "
                          f"(saved by {saved['world_size']} process(es)); the first batch after resuming is not "
                          "perturbed", stacklevel=2)
            return
        cache = saved["ranks"][rank]
        if cache is None:  # saved before the first backward: nothing cached yet
            return
        self.handle.load_state_dict({point: {k: None if v is None else v.to(self.device) for k, v in entry.items()}
                                     for point, entry in cache.items()})

    def set_loss_scale(self, scaler, device: torch.device) -> None:
        """Before a backward under a GradScaler: eps_l must come from the unscaled gradient (`Handle.grad_scale`)."""
        if self.handle is not None and scaler is not None and scaler.is_enabled():
            self.handle.grad_scale = scaler.scale(torch.ones((), device=device))  # a tensor: no host sync
