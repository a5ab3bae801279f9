"""Scenarios for the persist's commit-or-abort, and the making of a manager, with real gloo
ranks (:mod:`dist_pool`)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch

from torchstow.backends.filesystem import LocalFileStore
from torchstow.format.files import MANIFEST
from torchstow.management.tiered.manager import TieredManager


def state(step: int, rank: int) -> dict[str, Any]:
    """Each rank's own tensor (one data file per rank in the root's step)."""
    return {f"w{rank}": torch.arange(4096, dtype=torch.float32) * step + rank, "step": step}


def _durable_or_error(handle: Any) -> str | None:
    """Wait for ``handle`` to be durable: None, or what it raised instead ("Type: message")."""
    try:
        handle.wait("durable")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def coordinator_killed_after_root_manifest(rank: int, world_size: int, root: str, fast: str) -> dict:
    """Persist steps 1 and 2 (each rank on a node of its own); the coordinator SIGKILLs itself
    right after the root's manifest of step 2 landed. What rank 1's handle of step 2 says."""
    os.environ["TORCHSTOW_NODE"] = str(rank)
    manager = TieredManager(root, fast, persist_every=1, replicas=1, timeout=60)
    assert manager.save(1, state(1, rank)).result() == "durable"
    if rank == 0:
        original = LocalFileStore.publish_new

        def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
            original(self, name, data)
            if name == MANIFEST and self.location.rstrip("/").endswith("root/step-2"):
                os.kill(os.getpid(), signal.SIGKILL)

        LocalFileStore.publish_new = publish_new  # type: ignore[method-assign]
    handle = manager.save(2, state(2, rank))
    error = _durable_or_error(handle)
    return {"level": handle.level, "error": error, "exception": repr(handle.exception())}


@contextlib.contextmanager
def _raising_after_root_manifest(rank: int, step: int) -> Iterator[None]:
    """On the coordinator (rank 0): publishing the root's manifest of ``step`` raises right
    after it landed (not the store's failure: nothing reads it back there)."""
    if rank != 0:
        yield
        return
    original = LocalFileStore.publish_new

    def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
        original(self, name, data)
        if name == MANIFEST and self.location.rstrip("/").endswith(f"root/step-{step}"):
            raise RuntimeError("interrupted after the manifest landed")

    LocalFileStore.publish_new = publish_new  # type: ignore[method-assign]
    try:
        yield
    finally:
        LocalFileStore.publish_new = original  # type: ignore[method-assign]


def coordinator_raises_after_root_manifest(rank: int, world_size: int, root: str, fast: str) -> dict:
    """Persist step 1; the coordinator's commit raises right after the root's manifest landed.
    What each rank's handle says, and how often it read the root's manifest of step 1."""
    os.environ["TORCHSTOW_NODE"] = str(rank)
    reads = []
    original_read = LocalFileStore.read_file

    def read_file(self: LocalFileStore, name: str) -> bytes:
        if name == MANIFEST and self.location.rstrip("/").endswith("root/step-1"):
            reads.append(name)
        return original_read(self, name)

    LocalFileStore.read_file = read_file  # type: ignore[method-assign]
    with _raising_after_root_manifest(rank, 1):
        manager = TieredManager(root, fast, persist_every=1, replicas=1, timeout=60)
        try:
            handle = manager.save(1, state(1, rank))
            handle.wait("durable")
            return {"level": handle.level, "exception": repr(handle.exception()), "reads": len(reads)}
        finally:
            LocalFileStore.read_file = original_read  # type: ignore[method-assign]
            manager.close()


def frozen_on_rank_1(step: int, rank: int) -> dict[str, Any]:
    """Rank 0's tensor changes every step, rank 1's never (an incremental save writes none of it)."""
    return {
        f"w{rank}": torch.arange(4096, dtype=torch.float32) * (step if rank == 0 else 1) + rank,
        "step": step,
    }


def incremental_commit_raises_after_root_manifest(rank: int, world_size: int, root: str, fast: str) -> dict:
    """Persist steps 1 and 2 incrementally; the coordinator's commit of step 2 raises right after
    the root's manifest landed. What each rank's handle of step 2 says."""
    os.environ["TORCHSTOW_NODE"] = str(rank)
    with _raising_after_root_manifest(rank, 2):
        manager = TieredManager(root, fast, persist_every=1, replicas=1, timeout=60, incremental=True)
        try:
            assert manager.save(1, frozen_on_rank_1(1, rank)).result() == "durable"
            handle = manager.save(2, frozen_on_rank_1(2, rank))
            handle.wait("durable")
            return {"level": handle.level, "exception": repr(handle.exception())}
        finally:
            manager.close()


def incremental_root_listing_fails_on(rank: int, world_size: int, root: str, fast: str, failing: int) -> dict:
    """Persist steps 1 to 3 incrementally (:func:`frozen_on_rank_1`); listing the root fails
    on rank ``failing`` while step 2's persist looks for its base. What each rank's handles
    of steps 2 and 3 say."""
    from torchstow.management import catalog

    os.environ["TORCHSTOW_NODE"] = str(rank)
    original = catalog.list_checkpoints
    armed = {"on": False}

    def list_checkpoints(uri: Any, **kwargs: Any) -> Any:
        if armed["on"] and rank == failing:
            armed["on"] = False
            raise OSError("listing the root failed")
        return original(uri, **kwargs)

    catalog.list_checkpoints = list_checkpoints  # type: ignore[assignment]
    manager = TieredManager(root, fast, persist_every=1, replicas=1, timeout=20, incremental=True)
    try:
        assert manager.save(1, frozen_on_rank_1(1, rank)).result() == "durable"
        armed["on"] = True
        second = manager.save(2, frozen_on_rank_1(2, rank))
        with contextlib.suppress(Exception):
            second.wait("durable")
        armed["on"] = False
        third = manager.save(3, frozen_on_rank_1(3, rank))
        with contextlib.suppress(Exception):
            third.wait("durable")
        return {
            "levels": [second.level, third.level],
            "errors": [type(h.exception()).__name__ if h.exception() else None for h in (second, third)],
        }
    finally:
        catalog.list_checkpoints = original  # type: ignore[assignment]
        manager.close()


def persist_killed_at_a_file_event(
    rank: int, world_size: int, root: str, fast: str, victim: int, point: int, total: int
) -> dict:
    """Persist step 1, then step 2 (each rank on a node of its own); ``victim`` is SIGKILLed
    at its file event ``point`` under the root's step 2 (:func:`crash_helpers.crash_save`'s
    rule; ``victim`` -1: nobody, listing each rank's events). What each handle of step 2 says."""
    from torchstow.backends import filesystem

    from crash_helpers import _CountingOs

    os.environ["TORCHSTOW_NODE"] = str(rank)
    manager = TieredManager(root, fast, persist_every=1, replicas=1, timeout=60)
    assert manager.save(1, state(1, rank)).result() == "durable"
    hook = _CountingOs(point if rank == victim else -1, total, "SIGKILL", under=f"{root}/step-2")
    filesystem.os = hook  # type: ignore[assignment]
    try:
        handle = manager.save(2, state(2, rank))
        error = _durable_or_error(handle)
    finally:
        filesystem.os = os  # type: ignore[assignment]
    try:
        manager.close()
    except Exception:
        if error is None:  # close raises only the failure the handle reported
            raise
    return {"events": hook.events, "level": handle.level, "error": error}


def one_node_index_on_two_hosts(rank: int, world_size: int, root: str, fast_dir: str) -> str:
    """Both ranks say they are node 0 (no GROUP_RANK, launched as by srun), each with a fast
    tier of its own, as two hosts' shared memory is: what making the manager raises."""
    os.environ["TORCHSTOW_NODE"] = "0"
    try:
        TieredManager(root, f"{fast_dir}/host-{rank}", timeout=60).close()
    except ValueError as exc:
        return str(exc)
    finally:
        del os.environ["TORCHSTOW_NODE"]  # the pool's ranks run other tests next
    return "made"
