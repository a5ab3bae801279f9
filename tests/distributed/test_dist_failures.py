"""A failure at any protocol step, on any rank, makes every rank raise one
CheckpointException naming exactly the failed ranks with their original
exceptions; a failed save commits nothing. Over 3 gloo processes with the
coordinator at rank 0 and at rank 2, and in a single process (no_dist)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_scenarios import (
    committed_manifest_unreadable_on_rank_1,
    fails_before_the_protocol,
    fault_case,
    manifest_directory_sync_fails,
    plugin_error_on_rank_1,
    save_after_a_hung_interrupted_publish,
    save_with_a_plan_missing,
    unpicklable_failure,
    unpicklable_on_rank_1,
)

import torchstow
from dist_pool import WorkerPool

EXCEPTIONS = ["ValueError", "OSError", "RuntimeError"]
SAVE_STEPS = [
    ("set_up_storage_writer", "raise"),
    ("prepare_local_plan", "raise"),
    ("prepare_global_plan", "raise"),
    ("write_data", "raise"),
    ("write_data", "future"),
    ("finish", "raise"),
    ("planner.create_local_plan", "raise"),
    ("planner.create_global_plan", "raise"),
]
LOAD_STEPS = [
    ("read_metadata", "raise"),
    ("set_up_storage_reader", "raise"),
    ("prepare_local_plan", "raise"),
    ("prepare_global_plan", "raise"),
    ("read_data", "raise"),
    ("read_data", "future"),
    ("planner.create_local_plan", "raise"),
    ("planner.create_global_plan", "raise"),
]
# Steps only the coordinator runs: a fault meant for another rank never fires.
COORDINATOR_ONLY = {"prepare_global_plan", "finish", "read_metadata", "planner.create_global_plan"}
CASES = [
    pytest.param(op, step, mode, EXCEPTIONS[i % 3], id=f"{op}-{step}-{mode}")
    for i, (op, step, mode) in enumerate(
        [("save", *s) for s in SAVE_STEPS] + [("load", *s) for s in LOAD_STEPS]
    )
]


def _check_failure(result: dict[str, Any], step: str, mode: str, exc: str, victims: set[int]) -> None:
    assert result.get("failures") is not None, f"the {step} fault did not fail this rank: {result}"
    assert result["class"] == "CheckpointException"
    assert not result["timeout"]
    assert set(result["failures"]) == victims
    for victim in victims:
        failure = result["failures"][victim]
        assert failure["builtin"] == exc, failure  # the very class raised there, not a stand-in
        assert f"rank {victim}" in failure["message"]
        assert f"rank {victim}: {exc}:" in result["message"]
        if step.startswith("planner."):
            assert failure["frames"][-1] == "_maybe_fail"  # the traceback ends where it was raised
        elif mode == "raise":
            assert failure["frames"][-1] == "_inject"
            assert f"injected fault in {step}" in failure["message"]
        else:
            assert f"injected failed future from {step}" in failure["message"]
            assert "steps.py" in failure["files"]  # the protocol module (core/protocol/steps.py)


@pytest.mark.parametrize("coordinator", [0, 2], ids=["coordinator-0", "coordinator-2"])
@pytest.mark.parametrize("on_coordinator", [True, False], ids=["fault-on-coordinator", "fault-on-other-rank"])
@pytest.mark.parametrize(("op", "step", "mode", "exc"), CASES)
def test_failure_reaches_every_rank(
    pools: Any,
    tmp_path: Path,
    op: str,
    step: str,
    mode: str,
    exc: str,
    coordinator: int,
    on_coordinator: bool,
) -> None:
    victim = coordinator if on_coordinator else 1
    path = tmp_path / "ckpt"
    results = pools(3).run(fault_case, str(path), op, step, mode, exc, [victim], coordinator)
    if not on_coordinator and step in COORDINATOR_ONLY:
        assert results == [{"ok": True}] * 3  # the step never runs on rank 1
        assert (path / "manifest.json").exists()
        return
    for result in results:
        _check_failure(result, step, mode, exc, {victim})
    assert len({r["message"] for r in results}) == 1
    assert (path / "manifest.json").exists() == (op == "load")  # a failed save commits nothing
    if op == "save":  # ... and every rank removed the data it wrote
        assert not [f.name for f in path.glob("*.bin")]


@pytest.mark.parametrize(("op", "step", "mode", "exc"), CASES)
def test_failure_in_a_single_process(tmp_path: Path, op: str, step: str, mode: str, exc: str) -> None:
    path = tmp_path / "ckpt"
    result = fault_case(0, 1, str(path), op, step, mode, exc, [0], 0, no_dist=True)
    _check_failure(result, step, mode, exc, {0})
    assert (path / "manifest.json").exists() == (op == "load")
    if op == "save":
        assert not [f.name for f in path.glob("*.bin")]


def test_failures_on_several_ranks_are_all_reported(pools: Any, tmp_path: Path) -> None:
    results = pools(3).run(
        fault_case, str(tmp_path / "ckpt"), "save", "write_data", "raise", "OSError", [0, 1], 2
    )
    for result in results:
        _check_failure(result, "write_data", "raise", "OSError", {0, 1})
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


def test_torchstow_errors_keep_their_class_across_ranks(pools: Any, tmp_path: Path) -> None:
    """A load that fails with CheckpointNotFoundError on the coordinator raises a
    CheckpointException that is also a CheckpointNotFoundError on every rank."""
    results = pools(3).run(
        fault_case,
        str(tmp_path / "ckpt"),
        "load",
        "read_metadata",
        "raise",
        "CheckpointNotFoundError",
        [1],
        1,
    )
    for result in results:
        assert result["class"] == "CheckpointException[CheckpointNotFoundError]"
        assert result["failures"][1]["type"] == "CheckpointNotFoundError"


def test_unpicklable_exception_travels_as_a_stand_in(pools: Any, tmp_path: Path) -> None:
    results = pools(3).run(unpicklable_failure, str(tmp_path / "ckpt"))
    for rank, result in enumerate(results):
        assert set(result["failures"]) == {1}
        failure = result["failures"][1]
        if rank == 1:
            assert result["is_original"]  # the failing rank keeps its own exception object
        else:
            assert result["remote"]
            assert failure["type"] == "RemoteError"
            assert failure["message"] == (
                "dist_scenarios.unpicklable_failure.<locals>.LocalError: a local exception class on rank 1"
            )
            assert 'raise LocalError("a local exception class on rank 1")' in result["remote_traceback"]
        assert failure["frames"][-1] == "create_local_plan"
    assert not (tmp_path / "ckpt" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("op", "victim", "exc"),
    [
        ("save", 0, "ValueError"),
        ("save", -1, "ValueError"),
        ("async_save", 1, "RuntimeError"),
        ("load", 1, "TypeError"),
        ("load", -1, "TypeError"),
    ],
)
def test_a_failure_before_the_first_collective_reaches_every_rank(
    tmp_path: Path, op: str, victim: int, exc: str
) -> None:
    """A rank whose call fails while it prepares (its arguments, its Statefuls) still runs the
    protocol's collectives, so the others raise its failure at once instead of waiting for
    it until the timeout. A fresh group: before, the others timed out and broke theirs."""
    outcomes = WorkerPool.run_once(
        2, fails_before_the_protocol, str(tmp_path / "ckpt"), op, victim, timeout=90
    )
    for outcome in outcomes:
        assert outcome.status == "ok", outcome
        result = outcome.value
        if victim == -1 and op == "save":  # every rank failed alike: each raises its own error
            assert result["class"] == exc, result
            continue
        # a load's first step is the coordinator's alone: its failure is the one reported
        failed = 0 if victim == -1 else victim
        assert result["class"].startswith("CheckpointException"), result
        assert set(result["failures"]) == {failed}
        assert result["failures"][failed]["type"] == exc
    assert not (tmp_path / "ckpt" / "manifest.json").exists() or op == "load"


@pytest.mark.parametrize(
    ("op", "step"),
    [
        ("save", "save planning"),
        ("async_save", "save planning"),
        ("load-metadata", "load reading metadata"),
        ("load-plan", "load planning"),
    ],
)
def test_a_value_that_does_not_unpickle_on_one_rank_fails_every_rank_at_once(
    pools: Any, tmp_path: Path, op: str, step: str
) -> None:
    """What the coordinator sends (a plan, the manifest) does not unpickle on rank 1: every
    rank raises the same CheckpointException naming rank 1's error, at that step (before:
    rank 1 raised alone and rank 0 waited at the next collective until the timeout)."""
    results = pools(2).run(unpicklable_on_rank_1, str(tmp_path / "ckpt"), op, 20.0)
    for result in results:
        assert result.get("class", "").startswith("CheckpointException"), results
        assert not result["timeout"], results
        assert set(result["failures"]) == {1}, results
        assert result["failures"][1]["type"] == "ModuleNotFoundError", results
        assert "installed on rank 0 only" in result["failures"][1]["message"], results
        assert f"checkpoint {step} failed" in result["message"], results
    if op in ("save", "async_save"):
        assert not (tmp_path / "ckpt" / "manifest.json").exists()


def test_a_committed_manifest_that_does_not_unpickle_on_a_rank_keeps_its_data(
    pools: Any, tmp_path: Path
) -> None:
    """The coordinator committed, but the manifest it sends back does not unpickle on rank 1:
    every rank raises (before: rank 0 returned while rank 1 raised alone), rank 1 reads the
    location, and every rank keeps its files (before an earlier fix: rank 1 removed them,
    and the committed checkpoint lost its data)."""
    path = tmp_path / "ckpt"
    outcomes = pools(2).run(committed_manifest_unreadable_on_rank_1, str(path))
    for outcome in outcomes:
        assert not outcome["ok"] and any("did commit" in note for note in outcome["notes"]), outcomes
    loaded = torchstow.read(str(path))
    for rank in range(2):
        assert torch.equal(loaded[f"w{rank}"], torch.arange(1024.0) + rank)


def test_a_global_plan_of_the_wrong_length_fails_every_rank(tmp_path: Path) -> None:
    """A planner whose global plan has fewer plans than ranks fails the planning step on
    every rank (before: the coordinator raised ValueError alone and the others timed out)."""
    path = tmp_path / "ckpt"
    outcomes = WorkerPool.run_once(2, save_with_a_plan_missing, str(path), timeout=90)
    for outcome in outcomes:
        assert outcome.status == "ok", outcome
        result = outcome.value
        assert result["class"].startswith("CheckpointException"), result
        assert set(result["failures"]) == {0}, result
        assert "2 ranks" in result["failures"][0]["message"], result
    assert not (path / "manifest.json").exists()


def test_a_plugins_error_with_its_own_constructor_arrives_as_a_checkpoint_exception(
    pools: Any, tmp_path: Path
) -> None:
    """A TorchstowError subclass whose constructor takes other arguments cannot be mixed
    into the CheckpointException: every rank still raises a CheckpointException holding it
    (before: TypeError from building the mixed class)."""
    for result in pools(2).run(plugin_error_on_rank_1, str(tmp_path / "ckpt")):
        assert result["class"].startswith("CheckpointException"), result
        assert set(result["failures"]) == {1}
        assert result["failures"][1]["type"] == "PluginError"


def test_a_hung_interrupted_publish_fails_a_later_save_within_its_timeout(pools: Any, tmp_path: Path) -> None:
    """A signal handler stopped a save on the coordinator while its manifest was being
    published, and that publish hangs. A later save to the same location waits for it (so
    that the interrupted manifest never lands over the later one), but within the save's
    timeout: every rank raises one CheckpointException naming the coordinator's
    StorageIOError (before: the coordinator waited for the hung publish for good, and the
    other ranks lost contact with it at their timeout)."""
    first, later = zip(*pools(2).run(save_after_a_hung_interrupted_publish, str(tmp_path / "ckpt"), 4.0))
    for failed in first:  # the handler's exception, on every rank
        assert failed["failures"][0]["type"] == "PreemptedError", first
    for failed in later:
        assert failed.get("class", "").startswith("CheckpointException") and not failed["timeout"], later
        assert set(failed["failures"]) == {0}, later
        assert failed["failures"][0]["type"] == "StorageIOError", later
        assert "has not ended after 2s" in failed["failures"][0]["message"], later


def test_a_manifest_that_could_not_be_made_durable_fails_every_rank_keeping_its_files(
    pools: Any, tmp_path: Path
) -> None:
    """The coordinator's manifest is in place but syncing its directory failed (EIO): the
    save fails on every rank with the coordinator's UncertainCommitError, and no rank removes
    its data, which the visible manifest names (before: the save succeeded)."""
    path = tmp_path / "ckpt"
    outcomes = pools(2).run(manifest_directory_sync_fails, str(path))
    for outcome in outcomes:
        assert outcome.get("ok") is not True, outcomes
        assert outcome["class"] == "CheckpointException[UncertainCommitError]", outcome
        assert "Input/output error" in outcome["failures"][0]["message"]
        assert len(outcome["files"]) == 1, outcome  # kept
    assert any("did commit" in note for note in outcomes[1]["notes"]), outcomes[1]
    loaded = torchstow.read(str(path))
    assert all(torch.equal(loaded[f"w{rank}"], torch.arange(8.0) + rank) for rank in range(2))
