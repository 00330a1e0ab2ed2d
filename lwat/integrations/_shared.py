"""What the framework callbacks share: check the arguments when built, attach when training starts, save and restore
the cache (in `lwat.cache`'s format, the trainer's), pass the loss scale."""

from __future__ import annotations

import contextlib
import warnings
from itertools import chain

import torch
from torch import nn

import lwat
from lwat import cache as saved_cache


@contextlib.contextmanager
def framework(extra: str):
    """Around the import of an integration's framework: where it is not installed, the error names the extra
    (`pip install "lwat[EXTRA]"`) that brings it."""
    try:
        yield
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f'{e}; lwat.integrations.{extra} needs it: pip install "lwat[{extra}]"',
                                  name=e.name) from None


class Attachment:
    """One callback's lwat state over a training run: the `attach` arguments, the live handle, the last cache.

    The arguments are checked when it is made (`check_options`). A saved cache is `lwat.cache`'s form,
    `{"world_size": W, "ranks": {rank: {"perturbation": handle.state_dict() on the CPU}}}`: every process perturbs
    with its own previous batch, so each keeps (and resumes) its own cache.
    """

    def __init__(self, eps, *, scale: str, points, depth: int | None, direction: str, kernels: str,
                 module: str | None):
        check_options(eps, scale=scale, points=points, depth=depth, direction=direction, kernels=kernels,
                      module=module)
        self.eps, self.module = eps, module
        self.options = dict(scale=scale, points=points, depth=depth, direction=direction,
                            kernels=kernels)  # to lwat.attach unchanged
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
        """This process's cache (live, or the last one) in the saved form (`lwat.cache.pack`), on the CPU."""
        cache = self.handle.state_dict() if self.handle is not None else self.last
        return saved_cache.pack({rank: saved_cache.entry(cache)}, world_size)

    def restore(self, saved: dict, rank: int, world_size: int) -> None:
        """Load this process's cache from `saved` (this format or the callbacks' older one) into the live handle
        (the next train pass is perturbed with it)."""
        mine = saved_cache.rank_entry(saved, rank, world_size, device=self.device)
        if mine is None:
            warnings.warn(f"lwat: no perturbation cache for process {rank} of {world_size} in the checkpoint "
                          f"(saved by {saved_cache.saved_world_size(saved)} process(es)); the first batch after "
                          "resuming is not perturbed", stacklevel=2)
            return
        if mine[saved_cache.KEY] is None:  # saved before the first backward: nothing cached yet
            return
        self.handle.load_state_dict(mine[saved_cache.KEY])

    def set_loss_scale(self, scaler, device: torch.device) -> None:
        """Before a backward under a GradScaler: eps_l must come from the unscaled gradient (`Handle.grad_scale`)."""
        if self.handle is not None and scaler is not None and scaler.is_enabled():
            self.handle.grad_scale = scaler.scale(torch.ones((), device=device))  # a tensor: no host sync


def check_options(eps, *, scale, points, depth, direction, kernels, module) -> None:
    """Refuse now what `lwat.attach` would refuse whatever the model, with attach's own messages: a callback is made
    long before training starts, and an error raised there would pass through many of the framework's frames.

    What depends on the model (point names, a selector that matches nothing, depth beyond the number of points, the
    submodule `module`) is checked when training starts.

    Raises:
        ValueError: eps, scale, direction or kernels that `lwat.attach` refuses; points of no kind it accepts; a depth
            that is not an int >= 1; a module name that is not a non-empty string.
    """
    probe = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))  # a model with one default point (its hidden Linear)
    lwat.attach(probe, eps, scale=scale, direction=direction, kernels=kernels).detach()
    if not _selector(points):
        lwat.select_points(probe, points)  # raises attach's message for a selector of no accepted kind
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be an int >= 1 (and at most the number of points), got {depth!r}")
    if module is not None and (not isinstance(module, str) or not module):
        raise ValueError(f"module must be a submodule's (dotted) name, got {module!r}")


def _selector(points) -> bool:
    # The kinds `lwat.select_points` accepts: None, names, a module class or tuple of classes, a callable.
    if points is None or callable(points) or isinstance(points, type):
        return True
    names = isinstance(points, (list, tuple)) and all(isinstance(p, str) for p in points)
    classes = isinstance(points, tuple) and all(isinstance(p, type) for p in points)
    return bool(points) and (names or classes)
