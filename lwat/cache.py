"""The perturbation cache as checkpoints keep it: one format, written and read here, for lwat's trainer and the
Lightning and Hugging Face callbacks.

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

KEY = "perturbation"  # an entry's cache


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


__all__ = ["KEY", "entry", "pack", "rank_entry", "saved_world_size"]
