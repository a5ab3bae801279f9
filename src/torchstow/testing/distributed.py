"""The multi-process conformance kit: one checkpoint saved and loaded by two gloo ranks,
each in its own process opening the same location with its own store.

This is what a distributed training job does, and what a store that keeps
its files in one process's memory, or caches listings per process, gets
wrong. Subclass :class:`DistributedBackendConformance` and set ``scheme``;
``root_uri`` and ``storage_options`` must mean the same place in a freshly
started process (they are sent to the ranks by pickle).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

import torchstow
from torchstow.testing._rules import rule
from torchstow.testing.base import ConformanceBase
from torchstow.testing.compare import assert_same_state, state_differences
from torchstow.testing.ranks import run_ranks
from torchstow.testing.states import zeros_like_state

__all__ = ["DistributedBackendConformance", "check_distributed_round_trip"]


def _tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rank_state(rank: int) -> dict[str, Any]:
    """What ``rank`` saves: a part every rank holds alike (stored once) and a part of its own."""
    return {
        "shared": {"weight": _tensor((64, 32), seed=0), "step": 7},
        "ranks": {f"rank{rank}": _tensor((256, 256), seed=1 + rank)},
    }


def full_state(world_size: int) -> dict[str, Any]:
    """The whole checkpoint: the shared part and every rank's own part."""
    state: dict[str, Any] = {"shared": rank_state(0)["shared"], "ranks": {}}
    for rank in range(world_size):
        state["ranks"].update(rank_state(rank)["ranks"])
    return state


def _save_and_load(
    rank: int, world_size: int, uri: str, options: dict[str, Any], timeout: float
) -> list[str]:
    """On every rank: save its part, load the whole checkpoint (other ranks' files
    included) together, then read it alone. Returns what differs (``[]`` when all is well)."""
    torchstow.save(rank_state(rank), uri, storage_options=options, metadata={"step": 7}, timeout=timeout)
    expected = full_state(world_size)
    target = zeros_like_state(expected)
    torchstow.load(target, uri, storage_options=options, timeout=timeout)
    differences = [f"load on rank {rank}: {d}" for d in state_differences(target, expected)]
    alone = torchstow.read(uri, storage_options=options)
    differences += [f"read on rank {rank}: {d}" for d in state_differences(alone, expected, ordered=False)]
    return differences


def check_distributed_round_trip(
    root_uri: str, storage_options: dict[str, Any], *, world_size: int = 2, timeout: float = 120.0
) -> None:
    """Save and load one checkpoint under ``root_uri`` from ``world_size`` gloo processes,
    then check it from this process; AssertionError on anything wrong."""
    uri = f"{root_uri.rstrip('/')}/step-7"
    results = run_ranks(_save_and_load, uri, storage_options, timeout, world_size=world_size, timeout=timeout)
    problems = [d for differences in results for d in differences]
    assert not problems, "\n".join(problems)
    expected = full_state(world_size)
    assert_same_state(torchstow.read(uri, storage_options=storage_options), expected, ordered=False)
    found = torchstow.list_checkpoints(root_uri, storage_options=storage_options)
    assert [(i.uri, i.step) for i in found] == [(uri, 7)], found


class DistributedBackendConformance(ConformanceBase):
    """Multi-process conformance test for a torchstow backend; subclass and set ``scheme``.

    ``world_size`` ranks (2) each run in a fresh process; ``timeout`` (seconds)
    bounds the whole test, so a store that deadlocks fails instead of hanging.
    """

    world_size: ClassVar[int] = 2
    timeout: ClassVar[float] = 120.0

    @rule(
        "several processes, each with its own store on one location, save and load one checkpoint",
        "keep nothing in one process's memory (every listing and read goes to the medium); make "
        "prepare idempotent when ranks race on it; open connections per process",
    )
    def test_save_and_load_from_several_processes(
        self, root_uri: str, storage_options: dict[str, Any]
    ) -> None:
        check_distributed_round_trip(
            root_uri, storage_options, world_size=self.world_size, timeout=self.timeout
        )
