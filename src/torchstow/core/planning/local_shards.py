"""DTensor shards without their DTensor: a local tensor that knows where it lies.

A writer process has no device mesh (and no process group to rebuild one),
yet it writes this rank's DTensor shards into a checkpoint of the *global*
tensors, so that it reshards on load. The trainer sends each DTensor as its
local tensor plus a :class:`ShardPlacement` (the global shape and this
shard's offsets in it); the writer marks the local tensor with it, and the
save planner places a marked tensor as that shard of that global tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ShardPlacement", "mark_shard", "shard_placement"]

_ATTR = "_torchstow_shard_placement"


@dataclass(frozen=True)
class ShardPlacement:
    """Where a local tensor lies in its global tensor; ``offsets`` None: this rank holds none of it."""

    global_size: tuple[int, ...]
    offsets: tuple[int, ...] | None


def mark_shard(tensor: torch.Tensor, placement: ShardPlacement) -> torch.Tensor:
    """Mark ``tensor`` as the shard ``placement`` describes; returns it."""
    setattr(tensor, _ATTR, placement)
    return tensor


def shard_placement(tensor: torch.Tensor) -> ShardPlacement | None:
    """The placement ``tensor`` was marked with, if any."""
    return getattr(tensor, _ATTR, None)
