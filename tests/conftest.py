"""Shared pytest fixtures: the test device comes from LWAT_TEST_DEVICE (default cpu)."""

import os

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("LWAT_TEST_DEVICE", "cpu"))
