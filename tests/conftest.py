"""Shared fixtures: the device comes from LWAT_TEST_DEVICE so the same suite runs on CUDA."""

import os

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("LWAT_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Test tensors are tiny: intra-op threads only add overhead (seconds per test on 2 busy cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
