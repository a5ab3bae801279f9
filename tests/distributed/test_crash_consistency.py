"""Crash consistency: a rank killed at any file event of a save never costs the
checkpoint that was there, nor one that committed.

Every rank of a real gloo group saves step 2 next to a committed step 1; one rank
is killed at one of its file events (SIGKILL, or SIGTERM under a handler that
unwinds the save). The restart's ``latest`` + ``load`` must then give step 1 or
step 2, bit-exact: never a committed manifest whose data a surviving rank deleted.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

import torchstow
from dist_pool import RankOutcome, WorkerPool

from crash_helpers import (
    CRASH_SIGNALS,
    assert_resumes,
    crash_save,
    crash_state,
    save_with_unsendable_manifest,
)


def _save_step_1(rank: int, world_size: int, root: str) -> None:
    torchstow.save(crash_state(1, world_size, rank), f"{root}/step-1", timeout=60)


def _events(pools: Any, world_size: int, root: Path, how: str = "save") -> list[list[str]]:
    """Step 1 committed under ``root``; every rank's file events in a fault-free save of step 2."""
    pool = pools(world_size)
    pool.run(_save_step_1, str(root))
    scratch = root.parent / f"{root.name}-count"
    shutil.copytree(root, scratch)
    outs = pool.run(crash_save, str(scratch), -1, -1, 0, "SIGKILL", how)
    assert all(o.get("ok") for o in outs), outs
    assert assert_resumes(str(scratch), world_size) == 2
    return [o["events"] for o in outs]


def _crash(
    root: Path, case: Path, world_size: int, victim: int, point: int, total: int, sig: str, how: str = "save"
) -> list[RankOutcome]:
    shutil.copytree(root, case)
    outcomes = WorkerPool.run_once(
        world_size, crash_save, str(case), victim, point, total, sig, how, timeout=90, settle=30
    )
    code = -signal.SIGKILL if sig == "SIGKILL" else 128 + signal.SIGTERM
    for rank, outcome in enumerate(outcomes):
        if rank == victim:
            assert (outcome.status, outcome.exitcode) == ("dead", code), outcome
        else:  # a survivor fails (or, killed after its answer, succeeds): it never hangs
            assert outcome.status == "ok", outcome
    return outcomes


@pytest.mark.parametrize("sig", CRASH_SIGNALS)
def test_coordinator_killed_after_publishing_leaves_a_loadable_checkpoint(
    pools: Any, tmp_path: Path, sig: str
) -> None:
    """The reported case: rank 0 dies after linking manifest.json, before removing its
    temporary manifest. Rank 1 keeps its data file, and the resume loads step 2."""
    root = tmp_path / "run"
    events = _events(pools, 2, root)
    point = events[0].index("link") + 1  # the unlink of the temporary manifest
    assert events[0][point] == "unlink"
    case = tmp_path / "case"
    outcomes = _crash(root, case, 2, 0, point, len(events[0]), sig)
    assert (case / "step-2" / "manifest.json").exists()
    assert assert_resumes(str(case), 2) == 2
    survivor = outcomes[1].value
    assert survivor["error"] == "CheckpointTimeoutError"
    assert any("did commit" in note for note in survivor["notes"]), survivor


def test_a_committed_manifest_that_cannot_be_sent_back_keeps_every_ranks_data(
    pools: Any, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    notes = pools(2).run(save_with_unsendable_manifest, str(root / "step-2"))
    assert all(any("did commit" in note for note in mine) for mine in notes), notes
    assert assert_resumes(str(root), 2) == 2


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_killed_at_every_file_event_resumes(pools: Any, tmp_path: Path, world_size: int) -> None:
    root = tmp_path / "run"
    events = _events(pools, world_size, root)
    outcomes = {}
    for victim, mine in enumerate(events):
        for point in range(len(mine) + 1):  # before each event, and after the last
            for sig in CRASH_SIGNALS:
                case = tmp_path / f"r{victim}-{point}-{sig}"
                _crash(root, case, world_size, victim, point, len(mine), sig)
                outcomes[(victim, point, sig)] = assert_resumes(str(case), world_size)
                shutil.rmtree(case)
    # Killing the coordinator after its last event leaves step 2 committed; before its first, step 1.
    assert outcomes[(0, len(events[0]), "SIGKILL")] == 2
    assert outcomes[(0, 0, "SIGKILL")] == 1


@pytest.mark.slow  # 8 groups of 3 ranks: 20-30 s on the shared 2-core machine
def test_async_save_killed_on_a_non_coordinator_at_every_file_event_resumes(
    pools: Any, tmp_path: Path
) -> None:
    """An async save at 3 ranks (written and committed by each rank's background thread):
    rank 1 killed at each of its file events, or after its last, by either signal. The
    restart loads step 1 or step 2 whole; killed before its first event, step 1."""
    root = tmp_path / "run"
    events = _events(pools, 3, root, "async_save")[1]
    assert events, "rank 1 writes a data file of its own"
    steps = {}
    for point in range(len(events) + 1):
        for sig in CRASH_SIGNALS:
            case = tmp_path / f"{point}-{sig}"
            _crash(root, case, 3, 1, point, len(events), sig, "async_save")
            steps[(point, sig)] = assert_resumes(str(case), 3)
            shutil.rmtree(case)
    assert steps[(0, "SIGKILL")] == 1, steps
