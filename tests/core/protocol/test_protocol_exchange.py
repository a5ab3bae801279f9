"""What the protocol sends between ranks, seen through a one-rank collective that
pickles like a real group: plans the coordinator leaves alone are not sent back,
and a step outcome that cannot be pickled fails its rank instead of the collective."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
import torchstow.planning
from torchstow.core.protocol.collective import SingleProcess
from torchstow.core.protocol.steps import load_state_dict, save_state_dict


class Loopback(SingleProcess):
    """One rank whose payloads are packed as if they crossed processes; records scatters."""

    crosses_processes = True

    def __init__(self) -> None:
        super().__init__()
        self.scattered: dict[str, int] = {}

    def scatter(self, objs: list[Any] | None, step: str = "") -> Any:
        assert objs is not None
        self.scattered[step] = len(objs[0])
        return objs[0]


def test_plans_left_unchanged_are_not_sent_back(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(500)}
    coll = Loopback()
    save_state_dict(state, torchstow.storage_writer(tmp_path / "c"), collective=coll)
    target = {key: torch.zeros(4) for key in state}
    load_state_dict(target, torchstow.storage_reader(tmp_path / "c"), collective=coll)
    assert all(torch.equal(target[k], state[k]) for k in state)
    assert coll.scattered["save planning"] > 10_000  # the global save plan differs: sent in full
    assert coll.scattered["load planning"] < 100  # the load plan came back as it went: a marker


class _LockedPlanner(torchstow.planning.DefaultSavePlanner):
    def create_local_plan(self) -> Any:
        plan = super().create_local_plan()
        return type(plan)(plan.items, planner_data={"lock": threading.Lock()})


def test_an_outcome_that_cannot_be_pickled_fails_its_rank(tmp_path: Path) -> None:
    with pytest.raises(torchstow.CheckpointException) as info:
        save_state_dict(
            {"w": torch.ones(2)},
            torchstow.storage_writer(tmp_path / "c"),
            planner=_LockedPlanner(),
            collective=Loopback(),
        )
    error, _ = info.value.failures[0]
    assert isinstance(error, TypeError)
    assert "lock" in str(error)
    assert not (tmp_path / "c" / "manifest.json").exists()


class Mirror(Loopback):
    """The coordinator of ``world_size`` SPMD ranks, each of which sends what it sends."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size

    def gather(self, obj: Any, step: str = "") -> list[Any]:
        return [obj] * self.world_size


def _mismatched_load(tmp_path: Path, world_size: int) -> tuple[int, str]:
    """Load a state dict whose every key is missing (DDP's ``module.`` prefix) on every rank:
    the bytes the coordinator scatters back, and the error's message."""
    state = {f"layers.{i}.weight": torch.zeros(1) for i in range(500)}
    if not (tmp_path / "c").exists():
        torchstow.save(state, tmp_path / "c")
    coll = Mirror(world_size)
    target = {f"module.{k}": v for k, v in state.items()}
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        load_state_dict(target, torchstow.storage_reader(tmp_path / "c"), collective=coll, read_once=False)
    assert set(info.value.failures) == set(range(world_size))
    return coll.scattered["load planning"], str(info.value)


def test_ranks_failing_alike_send_and_show_their_failure_once(tmp_path: Path) -> None:
    one_size, one_message = _mismatched_load(tmp_path, 1)
    size, message = _mismatched_load(tmp_path, 32)
    # Before: the failure went back to every rank 32 times over, and the message held 32 copies
    # (a 22,000-key state dict: 7 MB per rank, so gigabytes on every rank of a large job).
    assert size < 1.2 * one_size
    assert len(message) < 1.2 * len(one_message)
    assert "ranks 0-31: StateDictMismatchError: the state dict does not match" in message
