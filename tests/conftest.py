"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def realdata() -> Path:
    """Folder of the real ACDC/LA data (``SEMIDIFF_REALDATA``); skips the test without it."""
    value = os.environ.get("SEMIDIFF_REALDATA")
    if not value or not Path(value).is_dir():
        pytest.skip("SEMIDIFF_REALDATA not set or folder missing: real-data test skipped")
    return Path(value)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny nets on a busy 2-core CPU are far slower with thread
    contention. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
