"""A persist whose commit fails after the root's manifest landed: no rank removes a file
that manifest names, the step is durable (reported so, never copied again), and it loads
bit-exact; a persist that surely did not commit still leaves nothing behind."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from persist_scenarios import (
    coordinator_killed_after_root_manifest,
    coordinator_raises_after_root_manifest,
    frozen_on_rank_1,
    incremental_commit_raises_after_root_manifest,
    incremental_root_listing_fails_on,
    state,
)

import torchstow
from dist_pool import WorkerPool
from torchstow import CheckpointManager, verify
from torchstow.backends.filesystem import LocalFileStore
from torchstow.errors import CheckpointException
from torchstow.format.codec import decode_metadata
from torchstow.format.files import MANIFEST
from torchstow.format.manifest import located_files
from torchstow.management.tiered import manager as tiered


def _named_files(step_dir: Path) -> set[str]:
    """The data files the manifest committed in ``step_dir`` names."""
    raw = (step_dir / MANIFEST).read_bytes()
    return located_files(decode_metadata(raw, read_file=lambda n, _: (step_dir / n).read_bytes()))


def _loads_exact(step_dir: Path, step: int, ranks: int = 1) -> None:
    expected = {k: v for rank in range(ranks) for k, v in state(step, rank).items()}
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in expected.items()}
    torchstow.load(target, str(step_dir))
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(target[key].view(torch.int32), value.view(torch.int32)), key
        else:
            assert target[key] == value, key
    assert verify(str(step_dir)).ok


def _after_root_manifest(monkeypatch: pytest.MonkeyPatch, root: Path, step: int, then: Any) -> None:
    """Make the root's manifest of ``step`` land, then ``then(store)`` (which raises)."""
    original = LocalFileStore.publish_new

    def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
        original(self, name, data)
        if name == MANIFEST and self.location.rstrip("/") == str(root / f"step-{step}"):
            then(self)

    monkeypatch.setattr(LocalFileStore, "publish_new", publish_new)


def test_a_commit_that_raises_after_the_root_manifest_landed_keeps_the_step_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"

    def interrupted(store: LocalFileStore) -> None:
        raise RuntimeError("interrupted after the manifest landed")

    _after_root_manifest(monkeypatch, root, 1, interrupted)
    copies = []
    original_copy = tiered._copy_checked
    monkeypatch.setattr(tiered, "_copy_checked", lambda *a: (copies.append(a[2]), original_copy(*a)))
    with CheckpointManager(root, fast=f"{tmp_path}/fast/{{node}}", persist_every=1) as manager:
        handle = manager.save(1, state(1, 0))
        assert handle.result() == "durable" and handle.exception() is None
        assert handle.stats["durable"].bytes == 4096 * 4  # what it copied
        named = _named_files(root / "step-1")
        assert named and all((root / "step-1" / n).is_file() for n in named)
        assert manager.save(2, state(2, 0)).result() == "durable"  # the retry finds step 1 committed
    assert len(copies) == 2  # step 1's one file copied once, never onto its committed checkpoint
    _loads_exact(root / "step-1", 1)
    _loads_exact(root / "step-2", 2)


def test_an_incremental_persist_whose_commit_raises_after_landing_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a plain persist: the incremental save of step 2 fails after its manifest landed in
    the root; its handle reports the step durable (not failed), every file stays, it loads."""
    root = tmp_path / "root"

    def interrupted(store: LocalFileStore) -> None:
        raise RuntimeError("interrupted after the manifest landed")

    _after_root_manifest(monkeypatch, root, 2, interrupted)
    fast = f"{tmp_path}/fast/{{node}}"
    with CheckpointManager(root, fast=fast, persist_every=1, incremental=True) as manager:
        assert manager.save(1, state(1, 0)).result() == "durable"
        handle = manager.save(2, state(2, 0))
        assert handle.result() == "durable" and handle.exception() is None
        assert handle.stats["durable"].bytes == torchstow.info(str(root / "step-2")).nbytes_written > 0
        named = _named_files(root / "step-2")
        assert named and all((root / "step-2" / n).is_file() for n in named)
        assert manager.save(3, state(3, 0)).result() == "durable"
    _loads_exact(root / "step-2", 2)
    _loads_exact(root / "step-3", 3)


def test_an_uncertain_root_commit_keeps_every_file_and_its_retry_finds_it_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest landed, the store reported a failure and reading it back failed too
    (UncertainCommitError): the outcome is unknown, so every file stays; the retry before the
    next persist reads the root, finds this save's manifest, and makes the step durable."""
    root = tmp_path / "root"
    unreadable = {"on": False}
    original_read = LocalFileStore.read_file

    def read_file(self: LocalFileStore, name: str) -> bytes:
        if unreadable["on"] and name == MANIFEST:
            raise OSError("the read-back failed")
        return original_read(self, name)

    def lost_reply(store: LocalFileStore) -> None:
        unreadable["on"] = True
        raise TimeoutError("the reply was lost")

    monkeypatch.setattr(LocalFileStore, "read_file", read_file)
    _after_root_manifest(monkeypatch, root, 1, lost_reply)
    with CheckpointManager(root, fast=f"{tmp_path}/fast/{{node}}", persist_every=1) as manager:
        first = manager.save(1, state(1, 0))
        with pytest.raises(CheckpointException, match="outcome is unknown"):
            first.wait("durable")
        assert first.level == "replicated"
        unreadable["on"] = False
        named = _named_files(root / "step-1")
        assert named and all((root / "step-1" / n).is_file() for n in named)
        assert manager.save(2, state(2, 0)).result() == "durable"
        first.wait("durable")
        assert first.level == "durable" and first.exception() is None
        assert first.stats["durable"].bytes == 4096 * 4  # what the first attempt copied
        assert [info.step for info in manager.steps() if "durable" in info.tiers] == [1, 2]
    _loads_exact(root / "step-1", 1)


def test_a_root_commit_that_surely_failed_leaves_nothing_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exclusive write fails and the read-back shows no manifest: the copied files go."""
    root = tmp_path / "root"
    original = LocalFileStore.publish_new
    fail = {"on": True}

    def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
        if fail["on"] and name == MANIFEST and self.location.rstrip("/") == str(root / "step-1"):
            raise OSError("no space left for the manifest")
        original(self, name, data)

    monkeypatch.setattr(LocalFileStore, "publish_new", publish_new)
    with CheckpointManager(root, fast=f"{tmp_path}/fast/{{node}}", persist_every=1) as manager:
        first = manager.save(1, state(1, 0))
        with pytest.raises(CheckpointException):
            first.wait("durable")
        assert not any(p.name.startswith("data-") for p in (root / "step-1").iterdir())
        fail["on"] = False
        assert manager.save(2, state(2, 0)).result() == "durable"
        assert first.result() == "durable"
    _loads_exact(root / "step-1", 1)


@pytest.mark.slow
def test_coordinator_killed_after_the_root_manifest_landed(tmp_path: Path) -> None:
    """Two real gloo ranks on two nodes: the coordinator dies right after publishing step 2's
    manifest in the root; the other rank's collective fails, and it keeps its files (the
    manifest names them), reading the root back to report the step durable."""
    root = tmp_path / "root"
    outcomes = WorkerPool.run_once(
        2,
        coordinator_killed_after_root_manifest,
        str(root),
        f"{tmp_path}/fast/{{node}}",
        timeout=120,
        settle=60,
    )
    assert (outcomes[0].status, outcomes[0].exitcode) == ("dead", -signal.SIGKILL), outcomes[0]
    assert outcomes[1].status == "ok", outcomes[1]
    named = _named_files(root / "step-2")
    assert {n.split("-")[2] for n in named} == {"0", "1"}  # a data file of each rank
    assert all((root / "step-2" / n).is_file() for n in named)
    _loads_exact(root / "step-2", 2, ranks=2)
    assert outcomes[1].value["level"] == "durable", outcomes[1].value
    assert outcomes[1].value["error"] is None, outcomes[1].value


@pytest.mark.slow
def test_every_rank_reports_durable_when_the_root_commit_raised_after_landing(tmp_path: Path) -> None:
    """The coordinator's commit raises after the root's manifest landed: the other rank (told
    the commit failed) keeps its file, reads the root back (once, for its cleanup and its
    report alike) and reports the step durable too."""
    root = tmp_path / "root"
    outcomes = WorkerPool.run_once(
        2, coordinator_raises_after_root_manifest, str(root), f"{tmp_path}/fast/{{node}}", timeout=120
    )
    assert [o.status for o in outcomes] == ["ok", "ok"], outcomes
    assert [o.value for o in outcomes] == [{"level": "durable", "exception": "None", "reads": 1}] * 2
    assert all((root / "step-1" / n).is_file() for n in _named_files(root / "step-1"))
    _loads_exact(root / "step-1", 1, ranks=2)


@pytest.mark.slow
def test_every_rank_reports_an_incremental_persist_durable_when_its_commit_raised_after_landing(
    tmp_path: Path,
) -> None:
    """Two gloo ranks, incremental: rank 1's tensor is unchanged, so it writes no file of step
    2 and cannot find one in the root's manifest; it learns from the coordinator that the
    step committed, and reports it durable as the coordinator does."""
    root = tmp_path / "root"
    outcomes = WorkerPool.run_once(
        2, incremental_commit_raises_after_root_manifest, str(root), f"{tmp_path}/fast/{{node}}", timeout=120
    )
    assert [o.status for o in outcomes] == ["ok", "ok"], outcomes
    assert [o.value for o in outcomes] == [{"level": "durable", "exception": "None"}] * 2
    of_rank_1 = {n for n in _named_files(root / "step-2") if n.split("-")[2] == "1"}
    assert of_rank_1 and of_rank_1 <= _named_files(root / "step-1")  # shared with step 1: none new
    restored = torchstow.read(str(root / "step-2"))
    for rank in range(2):
        assert torch.equal(restored[f"w{rank}"], frozen_on_rank_1(2, rank)[f"w{rank}"])
    assert verify(str(root / "step-2")).ok


@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1])
def test_an_incremental_persist_whose_base_lookup_fails_on_one_rank_saves_in_full_everywhere(
    tmp_path: Path, failing: int
) -> None:
    """Two gloo ranks, incremental, rank 1's tensor never changing: listing the root for step
    2's base fails on one rank. The coordinator alone picks the base, for every rank: when its
    own listing fails, every rank saves step 2 in full (before: step 2 failed with a
    CheckpointException on every rank, and an incremental persist is not retried); a failure
    elsewhere changes nothing (step 2 shares rank 1's tensor with step 1). Step 3 persists."""
    root = tmp_path / "root"
    outcomes = WorkerPool.run_once(
        2, incremental_root_listing_fails_on, str(root), f"{tmp_path}/fast/{{node}}", failing, timeout=150
    )
    assert [o.status for o in outcomes] == ["ok", "ok"], outcomes
    for outcome in outcomes:
        assert outcome.value == {"levels": ["durable", "durable"], "errors": [None, None]}, outcome.value
    tensor = 4096 * 4
    assert torchstow.info(str(root / "step-2")).nbytes_written == (2 * tensor if failing == 0 else tensor)
    restored = torchstow.read(str(root / "step-3"))
    for rank in range(2):
        assert torch.equal(restored[f"w{rank}"], frozen_on_rank_1(3, rank)[f"w{rank}"])
