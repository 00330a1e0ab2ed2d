"""The perturbation cache: each point's in memory (`PointCache`, made and refitted here for lwat/perturb.py and its
speed modules), and the form checkpoints keep it in (one format, for lwat's trainer and the Lightning and Hugging
Face callbacks).

In memory, a point's cache is r_l as int8 (in the activation's memory format) and eps_l as a 0-dim fp32 tensor,
made by the first training pass of each activation shape and then overwritten in place. A smaller batch uses its
first rows; another activation shape gets a new cache (eps_l = 0: that pass adds nothing).

Saved, it is

    {"world_size": W, "ranks": {rank: {"perturbation": cache, ...}}}

`cache` is one process's `Handle.state_dict()` with every tensor on the CPU, or None (no handle: an input-space
method; or saved before the first backward). Each process perturbs with the gradient of its own previous batch
(never broadcast, as in the paper), so each saves and resumes its own entry. A checkpoint holds every rank's entry
(the trainer, Lightning) or its own process's (Hugging Face: one file per process). An entry may carry more of its
process's state beside the cache (the trainer's "rng"). The trainer's checkpoint holds this form among its other keys,
and rank 0's entry once more at its top level ("perturbation", "rng"), where lwat before this module read it.

`rank_entry` also reads the layouts written before this module: the trainer's "ranks" as a list in rank order, or
no "ranks" at all (one process: "perturbation" and "rng" beside the checkpoint's other keys), and the callbacks'
{"world_size": W, "ranks": {rank: cache}}.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

_RESHAPED_WARN = 10  # warn once at this many activation-shape changes (each costs the point an unperturbed batch)
KEY = "perturbation"  # a saved entry's cache


# ---- In memory -----------------------------------------------------------------------------------------

@dataclass(eq=False)
class PointCache:
    """One point's cache and its handle (`Handle`, lwat/perturb.py)."""
    handle: object
    signs: torch.Tensor | None = None  # int8 r_l of the previous batch (Eq. 5), activation-shaped
    flat: torch.Tensor | None = None  # the same bytes as one 1-D tensor
    scale: torch.Tensor | None = None  # 0-dim fp32 eps_l (whatever the default dtype); 0 until the first backward
    layout: torch.memory_format = torch.contiguous_format  # of signs (that of the activation)
    reshaped: int = 0  # times a new activation shape (other than the batch size) replaced the cache
    made: int = 0  # caches made for this point (new shape, load_state_dict, ...)


def fits(signs: torch.Tensor | None, shape: torch.Size, device: torch.device) -> bool:
    """Whether the cache serves an output of this shape: same shape but perhaps fewer rows, same device."""
    return signs is not None and signs.shape[1:] == shape[1:] and shape[0] <= signs.shape[0] and signs.device == device


def fit(cache: PointCache, out: torch.Tensor, device: torch.device, layout: torch.memory_format) -> None:
    """A new cache (eps_l = 0) for an output of this shape, unless the current one serves it; sizing for
    torch.compile may also ask for another layout of the same values."""
    if not fits(cache.signs, out.shape, device):
        if cache.signs is not None and cache.signs.shape[1:] != out.shape[1:]:
            cache.reshaped += 1
            if cache.reshaped == _RESHAPED_WARN:
                warnings.warn(f"lwat: a point's activation shape changed {cache.reshaped} times ({tuple(out.shape)} "
                              "now): a batch whose activations differ in shape from the previous batch's is not "
                              "perturbed (dynamic padding of sequences does this every batch); pad to a fixed "
                              "length", stacklevel=2)
        _new(cache, out.shape, layout, device)
    elif cache.layout != layout:
        restore(cache, cache.signs, cache.scale, layout, device)


def restore(cache: PointCache, signs: torch.Tensor, scale: torch.Tensor, layout: torch.memory_format,
            device: torch.device) -> None:
    """A new cache holding `signs` and `scale` (a saved one, or the same values in another layout)."""
    _new(cache, signs.shape, layout, device)
    cache.signs.copy_(signs)
    cache.scale.copy_(scale)


def clear(cache: PointCache) -> None:
    cache.signs = cache.flat = cache.scale = None


def copy(points: dict[str, nn.Module]) -> dict:
    """The points' caches as `Handle.state_dict()` gives them."""
    def clone(t):
        return None if t is None else t.clone(memory_format=torch.preserve_format)
    return {n: {"signs": clone(m._lwat.signs), "scale": clone(m._lwat.scale)} for n, m in points.items()}


def load(points: dict[str, nn.Module], state: dict) -> None:
    """Restore the points' caches from `copy`'s form (`Handle.load_state_dict`), each on its point's device."""
    if set(state) != set(points):
        raise ValueError(f"cache has points {sorted(state)}, the model has {sorted(points)}")
    for name, module in points.items():
        signs, scale = state[name]["signs"], state[name]["scale"]
        if signs is None:
            clear(module._lwat)
        else:
            device = next(itertools.chain(module.parameters(), module.buffers()), signs).device
            restore(module._lwat, signs, scale, layout_of(signs), device)


def _new(cache: PointCache, shape: torch.Size, layout: torch.memory_format, device: torch.device) -> None:
    cache.flat = torch.zeros(shape.numel(), dtype=torch.int8, device=device)
    cache.signs, cache.layout = unflatten(cache.flat, shape, layout), layout
    cache.made += 1
    cache.scale = torch.zeros((), dtype=torch.float32, device=device)  # fp32 under any default dtype (bf16-true)
    cache.handle._make_scalars(device)


def layout_of(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not t.is_contiguous() else torch.contiguous_format


def unflatten(flat: torch.Tensor, shape: torch.Size, layout: torch.memory_format) -> torch.Tensor:
    if layout == torch.channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


# ---- Saved -----------------------------------------------------------------------------------------------


def entry(cache: dict | None, **extra) -> dict:
    """One process's entry: `cache` (a `Handle.state_dict()`, or None) with its tensors on the CPU, and `extra`."""
    return {KEY: _to(cache, "cpu"), **extra}


def pack(entries: dict[int, dict], world_size: int) -> dict:
    """The saved form of `entries` ({rank: `entry(...)`}, every rank or some) of a run of `world_size` processes."""
    return {"world_size": world_size, "ranks": dict(entries)}


def saved_world_size(saved: dict) -> int:
    """How many processes wrote `saved` (in any layout `rank_entry` reads)."""
    return _entries(saved)[0]


def rank_entry(saved: dict, rank: int, world_size: int, *, device=None, any_world: bool = False) -> dict | None:
    """This process's entry in `saved`, its cache moved to `device` (default: left on the CPU).

    Args:
        saved: the saved form (`pack`), or a checkpoint holding it, in this layout or an older one.
        rank, world_size: this process's rank and the number of processes now.
        device: where the cache's tensors go (the attached model's device).
        any_world: with another number of processes than wrote `saved`, take the entry of rank % the saved
            number (the trainer's choice at an epoch end); else there is none for this process.

    Returns:
        {"perturbation": cache or None, ...} as saved, or None when `saved` holds no entry for this process.
    """
    saved_world, entries = _entries(saved)
    if saved_world != world_size:
        if not any_world:
            return None
        rank %= saved_world
    found = entries.get(rank)
    if found is None:
        return None
    return {**found, KEY: _to(found[KEY], device)}


def _entries(saved: dict) -> tuple[int, dict[int, dict]]:
    ranks = saved.get("ranks")
    if ranks is None:  # the trainer's one-process layout: the entry's keys beside the checkpoint's others
        return saved.get("world_size", 1), {0: {k: saved.get(k) for k in (KEY, "rng") if k in saved or k == KEY}}
    if isinstance(ranks, list):  # the trainer's layout for several processes, in rank order
        return saved.get("world_size", len(ranks)), dict(enumerate(ranks))
    # {rank: entry}, or the callbacks' older {rank: cache}
    return saved.get("world_size", 1), {rank: e if _is_entry(e) else {KEY: e} for rank, e in ranks.items()}


def _is_entry(value) -> bool:
    # An entry, not a bare cache of the callbacks' old layout ({point: {"signs": tensor, "scale": tensor}}, or None):
    # an entry's cache maps points to dicts, where a bare cache's point named "perturbation" would map to tensors.
    if not isinstance(value, dict) or KEY not in value:
        return False
    cache = value[KEY]
    return cache is None or (isinstance(cache, dict) and all(isinstance(v, dict) for v in cache.values()))


def _to(cache: dict | None, device) -> dict | None:
    if cache is None or device is None:
        return cache
    return {point: {k: None if v is None else v.detach().to(device) for k, v in values.items()}
            for point, values in cache.items()}


__all__ = ["KEY", "PointCache", "clear", "copy", "entry", "fit", "fits", "layout_of", "pack", "rank_entry", "load",
           "restore", "saved_world_size", "unflatten"]
