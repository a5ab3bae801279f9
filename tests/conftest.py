"""Shared fixtures for the test suite."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from dist_pool import WorkerPool, free_port


@pytest.fixture
def ckpt(tmp_path: Any) -> str:
    """A path (not yet existing) for one checkpoint."""
    return os.path.join(str(tmp_path), "ckpt")


class Pools:
    """Worker pools by world size, started on first use and restarted if one broke."""

    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def __call__(self, world_size: int) -> WorkerPool:
        pool = self._pools.get(world_size)
        if pool is None or pool.broken:
            pool = self._pools[world_size] = WorkerPool(world_size)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools() -> Iterator[Pools]:
    """``pools(n)``: a group of ``n`` gloo worker processes shared by the whole session."""
    found = Pools()
    yield found
    found.close()


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A fresh directory in /dev/shm for shm:// checkpoints, removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="torchstow-test-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1 (a free port), in this process, for the whole session."""
    from moto_s3 import serve_in_thread

    with serve_in_thread(free_port()) as url:
        yield url
