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
