"""Scenarios for ``CheckpointManager`` over several ranks (see dist_pool.py)."""

from __future__ import annotations

import os
from typing import Any

import torch
from dist_scenarios import mesh_for, values
from torch.distributed.tensor import Shard, distribute_tensor

import torchstow


def _state(world_size: int, step: int) -> dict[str, Any]:
    mesh = mesh_for(world_size, ("S0",))
    weight = distribute_tensor(
        values("weight", (8 * world_size, 16), step), mesh, [Shard(0)], src_data_rank=None
    )
    return {"weight": weight, "step": step}


def save_steps_and_prune(rank: int, world_size: int, root: str, steps: int, asynchronous: bool) -> list[str]:
    """Save ``steps`` checkpoints through one manager (keep_last=2) on every rank;
    what the directory holds after each save, as this rank sees it once all ranks are past it."""
    import torch.distributed as dist

    seen = []
    with torchstow.CheckpointManager(root, keep_last=2) as manager:
        for step in range(1, steps + 1):
            manager.save(step, _state(world_size, step), asynchronous=asynchronous)
            manager.wait()
            dist.barrier()  # rank 0 prunes after its save commits; look once it is done
            seen.append(",".join(sorted(os.listdir(root))))
            dist.barrier()  # and before any rank starts the next save
    return seen


def restore_latest(rank: int, world_size: int, root: str) -> tuple[int, bool]:
    """Restore the newest step into a fresh sharded state on every rank; (step, bit-exact)."""
    manager = torchstow.CheckpointManager(root, keep_last=2)
    target = _state(world_size, 0)
    step = manager.restore(target)
    expected = values("weight", (8 * world_size, 16), step)
    got = target["weight"].full_tensor()
    return step, bool(
        torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) and target["step"] == step
    )


def save_steps(
    rank: int, world_size: int, root: str, steps: int, asynchronous: bool, incremental: bool = False
) -> None:
    """As a training loop does: one save per step, nothing in between (with ``incremental``,
    a frozen tensor joins the state and every save after the first is incremental)."""
    frozen = {"frozen": torch.arange(4096.0)} if incremental else {}
    with torchstow.CheckpointManager(root, keep_last=2, incremental=incremental) as manager:
        for step in range(1, steps + 1):
            manager.save(step, {**_state(world_size, step), **frozen}, asynchronous=asynchronous)
