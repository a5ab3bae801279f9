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
