"""Scenarios for the commit's outcome with real gloo ranks (:mod:`dist_pool`)."""

from __future__ import annotations

from typing import Any

import torch

import torchstow
from torchstow.core.planning import DefaultSavePlanner


class UnencodablePlanner(DefaultSavePlanner):
    """A planner whose global metadata cannot be written as JSON: the manifest's encoding
    fails at the commit, after every rank wrote its data, before any byte of it is written."""

    def create_global_plan(self, plans: list[Any]) -> tuple[list[Any], Any]:
        plans, metadata = super().create_global_plan(plans)
        metadata.planner_data = {"w": object()}
        return plans, metadata


def unencodable_save(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Each rank saves a tensor of its own through :class:`UnencodablePlanner`: the failures
    it raised, and its notes."""
    try:
        torchstow.save({f"w{rank}": torch.arange(1024.0) + rank}, path, planner=UnencodablePlanner())
    except torchstow.CheckpointException as exc:
        failed = sorted(type(e).__name__ for e, _ in exc.failures.values())
        notes = getattr(exc, "__notes__", [])
    else:
        failed, notes = [], []
    return {"failed": failed, "notes": notes}


def landed_then_raised_unreadable_elsewhere(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Each rank saves a tensor of its own; the coordinator's manifest publish raises right
    after the manifest landed (a signal handler's exception, say), and rank 1 cannot read
    the manifest back. The failures each rank raised, and its notes."""
    import os

    from torchstow.backends.filesystem import LocalFileStore
    from torchstow.format.files import MANIFEST

    original_publish, original_read = LocalFileStore.publish_new, LocalFileStore.read_file

    def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
        original_publish(self, name, data)
        if name == MANIFEST:
            raise RuntimeError("SIGTERM: stop training")

    def read_file(self: LocalFileStore, name: str) -> bytes:
        if name == MANIFEST and os.path.exists(os.path.join(path, MANIFEST)):
            raise OSError("the manifest could not be read back")
        return original_read(self, name)

    if rank == 0:
        LocalFileStore.publish_new = publish_new  # type: ignore[method-assign]
    else:
        LocalFileStore.read_file = read_file  # type: ignore[method-assign]
    try:
        torchstow.save({f"w{rank}": torch.arange(1024.0) + rank}, path)
    except torchstow.CheckpointException as exc:
        failed = sorted(type(e).__name__ for e, _ in exc.failures.values())
        notes = getattr(exc, "__notes__", [])
    else:
        failed, notes = [], []
    finally:
        LocalFileStore.publish_new = original_publish  # type: ignore[method-assign]
        LocalFileStore.read_file = original_read  # type: ignore[method-assign]
    return {"failed": failed, "notes": notes}
