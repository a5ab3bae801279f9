"""Scenarios for the persist's commit-or-abort with real gloo ranks (:mod:`dist_pool`)."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from torchstow.backends.filesystem import LocalFileStore
from torchstow.format.files import MANIFEST
from torchstow.management.tiered.manager import TieredManager


def state(step: int, rank: int) -> dict[str, Any]:
    """Each rank's own tensor (one data file per rank in the root's step)."""
    return {f"w{rank}": torch.arange(4096, dtype=torch.float32) * step + rank, "step": step}


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
    try:
        handle.wait("durable")
    except Exception as exc:
        error: str | None = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    return {"level": handle.level, "error": error, "exception": repr(handle.exception())}


def coordinator_raises_after_root_manifest(rank: int, world_size: int, root: str, fast: str) -> dict:
    """Persist step 1; the coordinator's commit raises right after the root's manifest landed
    (not the store's failure: nothing reads it back there). What each rank's handle says."""
    os.environ["TORCHSTOW_NODE"] = str(rank)
    if rank == 0:
        original = LocalFileStore.publish_new

        def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
            original(self, name, data)
            if name == MANIFEST and self.location.rstrip("/").endswith("root/step-1"):
                raise RuntimeError("interrupted after the manifest landed")

        LocalFileStore.publish_new = publish_new  # type: ignore[method-assign]
    manager = TieredManager(root, fast, persist_every=1, replicas=1, timeout=60)
    try:
        handle = manager.save(1, state(1, rank))
        handle.wait("durable")
        return {"level": handle.level, "exception": repr(handle.exception())}
    finally:
        if rank == 0:
            LocalFileStore.publish_new = original  # type: ignore[method-assign]
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
        try:
            handle.wait("durable")
        except Exception as exc:
            error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            error = None
    finally:
        filesystem.os = os  # type: ignore[assignment]
    try:
        manager.close()
    except Exception:
        if error is None:  # close raises only the failure the handle reported
            raise
    return {"events": hook.events, "level": handle.level, "error": error}
