"""Shared fixtures for the test suite."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from dist_pool import PRELOAD, WorkerPool, free_port


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the session's forkserver (where every gloo group of the tests forks its ranks
    from: dist_pool's pools and ``torchstow.testing.run_ranks``) importing what the
    collected test modules' ranks import beyond torch and torchstow, as each such module
    names in ``FORKSERVER_PRELOAD``: each rank then forks with it imported rather than
    importing it itself (Lightning: seconds a rank). Without such a module, the first
    group starts the forkserver as before."""
    modules = {getattr(item, "module", None) for item in session.items}
    extra = sorted({name for module in modules for name in getattr(module, "FORKSERVER_PRELOAD", ())})
    if not extra or "forkserver" not in multiprocessing.get_all_start_methods():
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload([*PRELOAD, *extra])
    multiprocessing.forkserver.ensure_running()


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
