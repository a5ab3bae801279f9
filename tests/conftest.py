"""Shared fixtures for the test suite."""

from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.fixture
def ckpt(tmp_path: Any) -> str:
    """A path (not yet existing) for one checkpoint."""
    return os.path.join(str(tmp_path), "ckpt")
