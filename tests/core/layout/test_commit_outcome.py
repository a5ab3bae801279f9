"""One rule decides what a failed commit means (publish_manifest): a failure before any
byte of the manifest is written did not commit, so every rank removes its files at once;
the store's failure is read back; anything else raised while publishing is "landed" or
"unknown", never "not landed", and the chunk table stays."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from commit_scenarios import landed_then_raised_unreadable_elsewhere, unencodable_save

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout.commit import CommitOutcome, publish_manifest
from torchstow.core.layout.location import decode_manifest
from torchstow.format.files import MANIFEST, chunk_table_name, is_chunk_table
from torchstow.format.manifest import located_files


def test_a_manifest_that_cannot_be_encoded_is_not_committed_and_every_ranks_files_go(
    pools: Any, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt"
    outcomes = pools(2).run(unencodable_save, str(path))
    for outcome in outcomes:
        assert outcome["failed"] == ["ValueError"], outcome  # the encoder's error, on every rank
        assert not any("unknown" in note or "kept" in note for note in outcome["notes"]), outcome
    assert sorted(os.listdir(path)) == []  # removed at once: nothing left for gc


def test_a_manifest_that_landed_before_the_commit_raised_keeps_every_ranks_files(
    pools: Any, tmp_path: Path
) -> None:
    """The coordinator's commit raises after its manifest landed: no rank treats that as
    "not landed", so rank 1 keeps its file even where it cannot read the manifest back."""
    path = tmp_path / "ckpt"
    outcomes = pools(2).run(landed_then_raised_unreadable_elsewhere, str(path))
    for outcome in outcomes:
        assert outcome["failed"] == ["RuntimeError"], outcome  # the save fails all the same
    assert any("did commit" in note for note in outcomes[0]["notes"]), outcomes[0]
    assert any("kept" in note for note in outcomes[1]["notes"]), outcomes[1]
    store = LocalFileStore(str(path), str(path))
    named = located_files(decode_manifest(store, (path / MANIFEST).read_bytes()))
    assert {n.split("-")[2] for n in named} == {"0", "1"}  # a data file of each rank
    assert named <= set(os.listdir(path))
    loaded = torchstow.read(str(path))
    for rank in range(2):
        assert torch.equal(loaded[f"w{rank}"], torch.arange(1024.0) + rank)


def _saved(tmp_path: Path) -> tuple[LocalFileStore, Any]:
    """A committed checkpoint's store and its manifest under a new save id (to publish again)."""
    torchstow.save({"w": torch.arange(64.0)}, str(tmp_path))
    store = LocalFileStore(str(tmp_path), str(tmp_path))
    metadata = decode_manifest(store, (tmp_path / MANIFEST).read_bytes())
    metadata.save_id = uuid.uuid4().hex
    return store, metadata


def _tables(tmp_path: Path) -> set[str]:
    return {name for name in os.listdir(tmp_path) if is_chunk_table(name)}


def test_each_failure_kind_gets_its_outcome_and_a_chunk_table_goes_only_when_not_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, metadata = _saved(tmp_path)
    before = _tables(tmp_path)
    original = LocalFileStore.publish
    when = {"now": ""}

    def publish(self: LocalFileStore, name: str, data: bytes) -> None:
        if name == MANIFEST and when["now"] == "store-fails":
            raise OSError("no space left for the manifest")
        if name == MANIFEST and when["now"] == "interrupted-before":
            raise KeyboardInterrupt
        original(self, name, data)
        if name == MANIFEST and when["now"] == "interrupted-after":
            raise RuntimeError("SIGTERM: stop training")

    monkeypatch.setattr(LocalFileStore, "publish", publish)
    expected: list[tuple[str, type[BaseException], bool | None, bool]] = [
        # failure kind, what propagates, outcome, whether this publish's chunk table stays
        ("store-fails", OSError, False, False),  # read back: another save's manifest is there
        ("interrupted-before", KeyboardInterrupt, None, True),  # the store may still be at work
        ("interrupted-after", RuntimeError, True, True),  # landed: its table is named
    ]
    for when["now"], raised, landed, table_stays in expected:
        metadata.save_id = uuid.uuid4().hex
        outcome = CommitOutcome()
        with pytest.raises(raised):
            publish_manifest(store, metadata, overwrite=True, outcome=outcome)
        assert outcome.landed is landed, when
        assert (chunk_table_name(metadata.save_id) in _tables(tmp_path)) is table_stays, when
    when["now"] = ""
    metadata.save_id = uuid.uuid4().hex
    metadata.planner_data = {"w": object()}  # the encoder fails before any byte is written
    outcome = CommitOutcome()
    outcome.landed = None
    with pytest.raises(ValueError, match="not JSON-serializable"):
        publish_manifest(store, metadata, overwrite=True, outcome=outcome)
    assert outcome.landed is False
    assert before <= _tables(tmp_path) and chunk_table_name(metadata.save_id) not in _tables(tmp_path)
