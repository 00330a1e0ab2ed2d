"""Tests of lwat.cache: the one saved form of the perturbation cache, and the older layouts it still reads."""

import pytest
import torch

from lwat import cache


def a_cache(seed):
    g = torch.Generator().manual_seed(seed)
    return {"net.1": {"signs": torch.randint(-1, 2, (4, 3), generator=g, dtype=torch.int8),
                      "scale": torch.rand((), generator=g)},
            "net.4": {"signs": None, "scale": None}}  # a point that has not run a training pass yet


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for point, entry in want.items():
        for key, value in entry.items():
            assert (got[point][key] is None) if value is None else torch.equal(got[point][key], value), (point, key)


def test_entries_round_trip_through_a_file(tmp_path):
    caches = {0: a_cache(0), 1: a_cache(1)}
    saved = cache.pack({r: cache.entry(c, rng=torch.tensor([r], dtype=torch.uint8)) for r, c in caches.items()}, 2)
    torch.save(saved, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert cache.saved_world_size(loaded) == 2
    for rank in (0, 1):
        mine = cache.rank_entry(loaded, rank, 2, device="meta")
        assert mine["perturbation"]["net.1"]["signs"].device.type == "meta"  # moved where it was asked
        assert_same(cache.rank_entry(loaded, rank, 2)["perturbation"], caches[rank])
        assert mine["rng"].tolist() == [rank]
    assert cache.rank_entry(loaded, 0, 3) is None  # another number of processes: none for this one ...
    assert_same(cache.rank_entry(loaded, 2, 3, any_world=True)["perturbation"], caches[0])  # ... or rank % 2's
    assert cache.rank_entry(cache.pack({1: cache.entry(a_cache(1))}, 2), 0, 2) is None  # one process's file
    assert cache.rank_entry(cache.pack({0: cache.entry(None)}, 1), 0, 1) == {"perturbation": None}


def test_entry_moves_the_cache_to_the_cpu_detached():
    live = {"p": {"signs": torch.ones(2, dtype=torch.int8), "scale": torch.tensor(2.0, requires_grad=True)}}
    saved = cache.entry(live)["perturbation"]
    assert not saved["p"]["scale"].requires_grad and saved["p"]["scale"].device.type == "cpu"


@pytest.mark.parametrize("layout", ["trainer, one process", "trainer, ranks as a list", "callbacks, bare caches"])
def test_older_layouts_are_read(layout):
    """Checkpoints written before lwat.cache: the trainer's (rank 0's entry at the top, other ranks in a list) and
    the Lightning and Hugging Face callbacks' ({rank: cache})."""
    caches = [a_cache(0), a_cache(1)]
    rngs = [torch.tensor([0], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8)]
    if layout == "trainer, one process":
        old, world = {"model": {}, "perturbation": caches[0], "rng": rngs[0], "world_size": 1, "batch": 0}, 1
    elif layout == "trainer, ranks as a list":
        old = {"perturbation": caches[0], "rng": rngs[0], "world_size": 2,
               "ranks": [{"perturbation": c, "rng": r} for c, r in zip(caches, rngs)]}
        world = 2
    else:
        old, world = {"world_size": 2, "ranks": {0: caches[0], 1: caches[1]}}, 2
    assert cache.saved_world_size(old) == world
    for rank in range(world):
        mine = cache.rank_entry(old, rank, world)
        assert_same(mine["perturbation"], caches[rank])
        if layout.startswith("trainer"):
            assert torch.equal(mine["rng"], rngs[rank])


def test_a_bare_cache_with_a_point_named_perturbation_is_not_taken_for_an_entry():
    bare = {"perturbation": {"signs": torch.ones(2, dtype=torch.int8), "scale": torch.tensor(1.0)}}
    assert_same(cache.rank_entry({"world_size": 1, "ranks": {0: bare}}, 0, 1)["perturbation"], bare)
    assert cache.rank_entry({"world_size": 1, "ranks": {0: None}}, 0, 1) == {"perturbation": None}
