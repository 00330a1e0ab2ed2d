"""Shared fixtures: the device comes from LWAT_TEST_DEVICE so the same suite runs on CUDA."""

import os
import re

# cuBLAS reads this when it first starts: needed for deterministic matrix products on CUDA (see `deterministic`).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
import torch.nn.functional as F

from lwat.data import synthetic_dataset
from lwat.models import build_model


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("LWAT_TEST_DEVICE", "cpu"))


@pytest.fixture
def deterministic():
    """Deterministic kernels for tests that compare two trainings bit for bit: on CUDA, cuDNN's default
    convolution backward kernels accumulate in a varying order (on CPU this changes nothing)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Test tensors are tiny: intra-op threads only add overhead (seconds per test on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained_mlp(one_thread):
    """The paper's toy tanh MLP, shrunk, fitted briefly on 8x8 synthetic data: (eval model, uint8 test images, labels)."""
    torch.manual_seed(0)
    ds = synthetic_dataset(n_train=64, n_test=64, size=8, channels=1)
    model = build_model("mlp_tanh", 10, image_size=8, hidden=(32, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x = ds.train_x.float() / 255
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), ds.train_y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval(), ds.test_x, ds.test_y


# ---- Markers (registered in pyproject.toml), set here from each test's file, name and parameters so that the test
# files carry none. `python -m pytest -m "not slow"` is the quick loop; CI runs everything (`python -m pytest -q`).
FILE_MARKERS = {
    "test_distributed.py": {"distributed", "compile"},  # gloo processes; one of its runs is under torch.compile
    "test_integrations.py": {"integrations"},  # examples/ run as a user runs them, each in a process of its own
    "test_integrations_distributed.py": {"integrations", "distributed"},
    "test_integrations_huggingface.py": {"integrations"},
    "test_integrations_lightning.py": {"integrations"},
}
# torch.compile runs where a test's name or a parameter says so (kernels "compiled" or "fused", compiled=True) ...
COMPILES = re.compile(r"(^|_)(compiled?|fused)(_|$)")
# ... and in these, which do not say so by name; not in these, where a failure replaces it.
ALSO_COMPILES = {"test_benchmark_row_against_hand_counts"}  # its row is eager-kernels mode: kernels="compiled"
NEVER_COMPILES = {"test_kernels_that_cannot_compile_are_one_line_exit_2"}
# Eager tests over about a second each on 2 busy CPU cores (--durations): trainings, reproductions, processes.
SLOW = set()


def compiles(item) -> bool:
    name = item.originalname
    if name in NEVER_COMPILES:
        return False
    params = getattr(item, "callspec", None)
    params = params.params if params is not None else {}
    return (bool(COMPILES.search(name)) or name in ALSO_COMPILES or params.get("compiled") is True
            or any(isinstance(v, str) and v in ("compiled", "fused") for v in params.values()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = set(FILE_MARKERS.get(item.path.name, ()))
        if compiles(item):
            marks.add("compile")
        if marks or item.originalname in SLOW:
            marks.add("slow")  # compile, distributed and integrations tests take seconds each
        for mark in sorted(marks):
            item.add_marker(mark)
