"""A rank that is killed, exits or stalls mid-save or mid-load makes the other
ranks fail with CheckpointTimeoutError within the timeout, never hang; nothing
is committed. Each case runs in its own group of processes (it breaks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_scenarios import (
    async_commit_group_with_a_straggler,
    async_commit_timeouts,
    async_save_without_a_peer,
    async_saves_after_a_timed_out_one,
    saves_after_a_timed_out_save,
    timed_fault,
)

import torchstow
from dist_pool import GROUP_TIMEOUT, WorkerPool


@pytest.mark.slow
@pytest.mark.parametrize(
    ("op", "step", "mode", "victim", "coordinator", "timeout"),
    [
        ("save", "write_data", "kill", 2, 0, 30.0),  # SIGKILL on a non-coordinator
        ("save", "write_data", "exit", 1, 1, 30.0),  # the coordinator itself exits
        ("save", "prepare_local_plan", "hang", 2, 0, 3.0),  # a stalled rank: only the timeout can tell
        ("async_save", "prepare_local_plan", "hang", 1, 0, 3.0),  # the background commit too
        ("load", "read_data", "kill", 0, 0, 30.0),  # the coordinator killed while reading
    ],
    ids=[
        "save-kill-rank2",
        "save-exit-coordinator1",
        "save-hang-rank2",
        "async-save-hang-rank1",
        "load-kill-coordinator0",
    ],
)
def test_lost_rank_fails_the_others_within_the_timeout(
    tmp_path: Path, op: str, step: str, mode: str, victim: int, coordinator: int, timeout: float
) -> None:
    path = tmp_path / "ckpt"
    if op == "load":
        torchstow.save({"shared": torch.arange(64.0), "meta": {"epoch": 1}}, path)
    outcomes = WorkerPool.run_once(
        3,
        timed_fault,
        str(path),
        op,
        step,
        mode,
        victim,
        coordinator,
        timeout,
        timeout=timeout + 30,
        settle=3,
    )
    for rank, outcome in enumerate(outcomes):
        if rank == victim:
            expected = {"kill": ("dead", -9), "exit": ("dead", 7), "hang": ("silent", None)}[mode]
            assert (outcome.status, outcome.exitcode) == expected
            continue
        assert outcome.status == "ok", outcome
        result = outcome.value
        assert result["class"] == "CheckpointTimeoutError"
        assert result["failures"] == {}
        assert (
            f"rank {rank} lost contact with its group of 3 ranks (coordinator {coordinator})"
            in result["message"]
        )
        assert f"timeout of {timeout:g}s" in result["message"]
        assert result["elapsed"] < timeout + 10  # failed by the timeout, not after it
    assert (path / "manifest.json").exists() == (op == "load")


def test_an_async_saves_commit_group_follows_the_saves_timeout(pools: Any, tmp_path: Path) -> None:
    """The private gloo group an async save commits on waits under the save's ``timeout``,
    or without one under the training group's own (the pools' GROUP_TIMEOUT), as a
    synchronous save would, and is made under the training group's own (before: torch's
    30-minute default for both)."""
    own = GROUP_TIMEOUT.total_seconds()
    for found in pools(2).run(async_commit_timeouts, str(tmp_path / "ckpt")):
        assert found == [(7.0, own), (own, own)]
    assert torch.equal(torchstow.read(str(tmp_path / "ckpt"))["w1"], torch.arange(8.0))


def test_an_async_saves_commit_group_waits_for_a_rank_later_than_the_saves_timeout(pools: Any) -> None:
    """A rank that reaches its first async save later than the save's ``timeout`` (a straggler
    of a training step) still joins the commit group: it is made under the training group's
    own timeout, the save's bounding only the save's collectives (before: the group was made
    under ``timeout=1``, and rank 0 raised torch's DistStoreError from async_save itself
    while rank 1 raised RuntimeError some 10 s later, neither a CheckpointException)."""
    assert pools(2).run(async_commit_group_with_a_straggler, 2.5) == [b"made"] * 2


@pytest.mark.slow
def test_a_first_async_save_whose_peer_never_comes_raises_checkpoint_timeout_error(tmp_path: Path) -> None:
    """The commit group is made on the first async save; a rank that never joins it (dead, or
    stalled past the training group's timeout) makes the others raise CheckpointTimeoutError,
    as every lost rank does (before: torch's DistStoreError from async_save). So does the
    group of a ReplicationStager (before: DistStoreError), made by the same function as the
    tiered manager's groups."""
    rank0, rank1 = WorkerPool.run_once(2, async_save_without_a_peer, str(tmp_path / "ckpt"), timeout=40)
    assert rank1.value == {"skipped": True}
    assert rank0.status == "ok", rank0
    assert rank0.value["class"] == "CheckpointTimeoutError", rank0.value
    assert "rank 0 lost contact with its group of 2 ranks" in rank0.value["message"]
    assert rank0.value["elapsed"] < 20  # the group's own timeout (2 s), not torch's 30 minutes
    assert not (tmp_path / "ckpt").exists()
    replication = rank0.value["replication"]
    assert replication["class"] == "CheckpointTimeoutError", replication
    assert "while making the ReplicationStager's group" in replication["message"]


@pytest.mark.slow
def test_saves_on_a_group_a_timeout_broke_say_so(pools: Any, tmp_path: Path) -> None:
    """After a collective times out, gloo closes the group's connections for good: the next
    save on it fails at once on every rank, and now says that the group is broken and what to
    do (before: "another rank died, stalled, or did not reach this step", a wrong lead)."""
    results = pools(2).run(saves_after_a_timed_out_save, str(tmp_path / "ckpt"))
    for first, second in results:
        assert first["class"] == "CheckpointTimeoutError", first
        assert second["class"] == "CheckpointTimeoutError", second
        assert "already lost contact in an earlier save or load" in second["message"]
        assert "Restart the job before saving again" in second["message"]
        assert second["elapsed"] < 10  # at once, not after its timeout of 30 s
    assert not (tmp_path / "ckpt-2" / "manifest.json").exists()


@pytest.mark.slow
def test_an_async_save_after_one_that_timed_out_commits(pools: Any, tmp_path: Path) -> None:
    """One slow async save must not lose every later checkpoint: the save after the one
    whose timeout broke the private commit group makes a new group (every rank at the same
    call) and commits (before: it failed at once on every rank, as did every async save
    after it, until the job restarted). About 4 s."""
    results = pools(2).run(async_saves_after_a_timed_out_one, str(tmp_path / "ckpt"))
    for first, second in results:
        assert first["class"] == "CheckpointTimeoutError", first
        assert second.get("ok"), second
        assert second["elapsed"] < 20
    saved = torchstow.read(str(tmp_path / "ckpt-2"))
    assert torch.equal(saved["w0"], torch.arange(4.0)) and torch.equal(saved["w1"], torch.arange(4.0) + 1)
    assert not (tmp_path / "ckpt-1" / "manifest.json").exists()
