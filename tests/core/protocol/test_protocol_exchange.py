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
