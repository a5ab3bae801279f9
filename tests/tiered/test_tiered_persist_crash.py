"""A persist killed at any file event of the coordinator, with three real gloo ranks on
three nodes: no rank removes a file that the root's committed manifest names, a surviving
rank reports the step durable exactly when its manifest landed, and the root alone (every
fast tier lost) loads step 1 or step 2 bit-exact."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from persist_scenarios import persist_killed_at_a_file_event, state

import torchstow
from dist_pool import WorkerPool
from torchstow.format.files import MANIFEST

RANKS = 3


def _run(tmp: Path, victim: int, point: int, total: int) -> tuple[Path, list[Any]]:
    root = tmp / "root"
    outcomes = WorkerPool.run_once(
        RANKS,
        persist_killed_at_a_file_event,
        str(root),
        f"{tmp}/fast/{{node}}",
        victim,
        point,
        total,
        timeout=120,
        settle=60,
    )
    return root, outcomes


def _root_resumes(root: Path) -> int:
    """``latest`` + ``load`` on the root give step 1 or 2, every rank's tensor bit-exact."""
    uri = torchstow.latest(str(root))
    assert uri is not None
    step = int(uri.rsplit("-", 1)[-1])
    expected = {k: v for rank in range(RANKS) for k, v in state(step, rank).items()}
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in expected.items()}
    torchstow.load(target, uri)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(target[key].view(torch.int32), value.view(torch.int32)), key
        else:
            assert target[key] == value, key
    assert torchstow.verify(uri).ok
    return step


@pytest.mark.slow
def test_coordinator_killed_at_every_file_event_of_a_persist(tmp_path: Path) -> None:
    root, outcomes = _run(tmp_path / "count", -1, -1, 0)
    assert [o.status for o in outcomes] == ["ok"] * RANKS, outcomes
    events = outcomes[0].value["events"]
    assert "link" in events  # the root's manifest is published among them
    assert _root_resumes(root) == 2
    steps = {}
    for point in range(len(events) + 1):  # before each event, and after the last
        root, outcomes = _run(tmp_path / f"p{point}", 0, point, len(events))
        assert (outcomes[0].status, outcomes[0].exitcode) == ("dead", -signal.SIGKILL), (point, outcomes[0])
        landed = (root / "step-2" / MANIFEST).exists()
        for outcome in outcomes[1:]:  # a survivor never hangs; it says durable iff the step is
            assert outcome.status == "ok", (point, outcome)
            assert (outcome.value["level"] == "durable") == landed, (point, outcome.value)
        steps[point] = _root_resumes(root)
        assert steps[point] == (2 if landed else 1), point
    assert steps[0] == 1 and steps[len(events)] == 2, steps
