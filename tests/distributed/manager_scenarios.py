"""Scenarios for ``CheckpointManager`` over several ranks (see dist_pool.py)."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from dist_scenarios import _subgroups, mesh_for, values
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


def _listing_apart(how: str) -> Any:
    """A stand-in for the manager's ``list_steps`` that lags behind (``"lags"``: the
    newest step not there yet, as a cached directory listing may) or fails (``"fails"``)."""
    from torchstow.management import manager as module

    original = module.list_steps

    def listing(*args: Any, **kwargs: Any) -> Any:
        if how == "fails":
            raise OSError("listing the root failed on this rank")
        found = original(*args, **kwargs)
        newest = max(info.step for info in found)
        return [info for info in found if info.step != newest]

    return listing


def restore_latest_listed_apart(rank: int, world_size: int, root: str, how: str) -> tuple[Any, ...]:
    """:func:`restore_latest` where rank 1's listing of the root differs (:func:`_listing_apart`).
    Every rank must restore the step the coordinator found. Also what ``steps()`` and
    ``latest_step()`` say on this rank, of a manager given the process group."""
    import torch.distributed as dist

    from torchstow.management import manager as module

    original = module.list_steps
    if rank == 1:
        module.list_steps = _listing_apart(how)  # type: ignore[assignment]
    try:
        manager = torchstow.CheckpointManager(root)
        target = _state(world_size, 0)
        step = manager.restore(target, timeout=20)
        grouped = torchstow.CheckpointManager(root, process_group=dist.group.WORLD)
        listed = (grouped.steps(), grouped.latest_step())
    finally:
        module.list_steps = original  # type: ignore[assignment]
    expected = values("weight", (8 * world_size, 16), step)
    got = target["weight"].full_tensor()
    exact = torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) and target["step"] == step
    return step, bool(exact), *listed


def incremental_save_listed_apart(
    rank: int, world_size: int, root: str, apart: int, how: str
) -> tuple[str | None, int, bool]:
    """Steps 1 and 2 saved; then a new incremental manager (as after a restart) saves step 3,
    whose weight is step 2's, while rank ``apart``'s listing of the root differs
    (:func:`_listing_apart`). The base this rank saved against, the step restored, and
    whether it is bit-exact."""
    from torchstow.management import manager as module

    with torchstow.CheckpointManager(root) as manager:
        for step in (1, 2):
            manager.save(step, _state(world_size, step), timeout=30)
    original_listing, original_save = module.list_steps, module.save
    bases = []

    def save(*args: Any, **kwargs: Any) -> Any:
        bases.append(kwargs.get("base"))
        return original_save(*args, **kwargs)

    module.save = save  # type: ignore[assignment]
    if rank == apart:
        module.list_steps = _listing_apart(how)  # type: ignore[assignment]
    try:
        with torchstow.CheckpointManager(root, incremental=True) as manager:
            manager.save(3, {**_state(world_size, 2), "step": 3}, timeout=30)
    finally:
        module.list_steps, module.save = original_listing, original_save  # type: ignore[assignment]
    target = _state(world_size, 0)
    step = torchstow.CheckpointManager(root).restore(target, timeout=30)
    got = target["weight"].full_tensor()
    expected = values("weight", (8 * world_size, 16), 2)
    return bases[0], step, bool(torch.equal(got.view(torch.uint8), expected.view(torch.uint8)))


def save_steps(
    rank: int, world_size: int, root: str, steps: int, asynchronous: bool, incremental: bool = False
) -> None:
    """As a training loop does: one save per step, nothing in between (with ``incremental``,
    a frozen tensor joins the state and every save after the first is incremental)."""
    frozen = {"frozen": torch.arange(4096.0)} if incremental else {}
    with torchstow.CheckpointManager(root, keep_last=2, incremental=incremental) as manager:
        for step in range(1, steps + 1):
            manager.save(step, {**_state(world_size, step), **frozen}, asynchronous=asynchronous)


def save_in_subgroups(rank: int, world_size: int, root: str, steps: int) -> tuple[list[str], int, bool]:
    """The even and the odd ranks each run a manager (keep_last=2) on their own root in their
    own subgroup: the odd group (without global rank 0) through ``process_group=``, the even one
    through ``save``'s ``process_group=`` and ``coordinator_rank=1`` (global rank 2). What its
    root holds at the end, how many times this rank pruned, and whether the newest step
    restores bit-exact in the group."""
    import torch.distributed as dist

    module = importlib.import_module("torchstow.management.prune")  # the module, not the function

    group = _subgroups(world_size)[rank % 2]
    group_rank = dist.get_rank(group)
    own = f"{root}/group{rank % 2}"
    per_save: dict[str, Any] = {} if rank % 2 else {"process_group": group, "coordinator_rank": 1}
    pruned = []
    original = module.prune_keeping

    def counting_prune(*args: Any, **kwargs: Any) -> list[str]:
        pruned.append(args)
        return original(*args, **kwargs)

    def state(step: int) -> dict[str, Any]:
        return {f"part{group_rank}": values(f"part{group_rank}", (8,), step), "step": step}

    module.prune_keeping = counting_prune  # type: ignore[assignment]
    try:
        by_manager = group if rank % 2 else None
        with torchstow.CheckpointManager(own, keep_last=2, process_group=by_manager) as manager:
            for step in range(1, steps + 1):
                manager.save(step, state(step), **per_save)
    finally:
        module.prune_keeping = original  # type: ignore[assignment]
    dist.barrier()  # every coordinator is past its last pruning
    target = state(0)
    step = torchstow.CheckpointManager(own, process_group=group).restore(target, coordinator_rank=0)
    expected = state(steps)
    restored = step == steps and all(torch.equal(target[k], v) for k, v in expected.items() if k != "step")
    return sorted(os.listdir(own)), len(pruned), restored and target["step"] == steps


def save_while_pruning_fails(rank: int, world_size: int, root: str) -> tuple[list[int], int]:
    """Three saves (keep_last=1), asynchronous, asynchronous, synchronous, while the
    coordinator's pruning fails (deleting old steps raises ``OSError``), as a loop does,
    each save under a 10 s timeout. The steps listed at the end, and how many warnings
    about pruning this rank logged."""
    import logging

    module = importlib.import_module("torchstow.management.prune")  # the module, not the function

    warned: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warned.append  # type: ignore[method-assign]
    log = logging.getLogger(module.__name__)
    original = module.prune_keeping

    def failing_prune(*args: Any, **kwargs: Any) -> list[str]:
        raise PermissionError("deleting an old step was refused")

    module.prune_keeping = failing_prune  # type: ignore[assignment]
    log.addHandler(handler)
    try:
        with torchstow.CheckpointManager(root, keep_last=1) as manager:
            for step in (1, 2, 3):
                manager.save(step, _state(world_size, step), asynchronous=step < 3, timeout=10)
            manager.wait()
            listed = manager.steps()
    finally:
        module.prune_keeping = original  # type: ignore[assignment]
        log.removeHandler(handler)
    return list(listed), sum("pruning" in r.getMessage() for r in warned if r.levelno == logging.WARNING)


def save_below_the_newest_step(rank: int, world_size: int, root: str) -> tuple[bool, str, list[str]]:
    """Steps 1 and 3 saved; a new manager (keep_last=1) restores step 1 and saves step 2 while
    rank 1's listing of the root lags (does not show step 3, :func:`_listing_apart`). Whether
    this rank raised a CheckpointExistsError, its message, and the root's entries after."""
    import torch.distributed as dist

    from torchstow.management import manager as module

    with torchstow.CheckpointManager(root) as manager:
        for step in (1, 3):
            manager.save(step, _state(world_size, step), timeout=30)
    original = module.list_steps
    manager = torchstow.CheckpointManager(root, keep_last=1)
    manager.restore(_state(world_size, 0), step=1, timeout=30)
    if rank == 1:
        module.list_steps = _listing_apart("lags")  # type: ignore[assignment]
    try:
        manager.save(2, _state(world_size, 2), timeout=30)
        raised, message = False, ""
    except torchstow.CheckpointExistsError as exc:
        raised, message = True, str(exc)
    finally:
        module.list_steps = original  # type: ignore[assignment]
    dist.barrier()
    return raised, message, sorted(os.listdir(root))
