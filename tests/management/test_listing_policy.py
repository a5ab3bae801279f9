"""One walk over a prefix, one error policy: ``scan`` (``torchstow ls``) and
``list_checkpoints``/``latest`` treat a child they cannot read alike."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.errors import StorageIOError
from torchstow.format.files import MANIFEST
from torchstow.management.listing import COMMITTED, UNREADABLE, scan


def _failing_reads(monkeypatch: pytest.MonkeyPatch, location: Path, error: OSError) -> None:
    """Reading the manifest under ``location`` raises ``error``; everything else reads."""
    read_file = LocalFileStore.read_file

    def failing(store: LocalFileStore, name: str) -> bytes:
        if name == MANIFEST and Path(store.location).name == location.name:
            raise error
        return read_file(store, name)

    monkeypatch.setattr(LocalFileStore, "read_file", failing)


def test_a_child_that_cannot_be_read_is_unreadable_to_both_and_the_rest_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2):
        torchstow.save({"w": torch.full((2,), float(step))}, tmp_path / f"step-{step}")
    _failing_reads(monkeypatch, tmp_path / "step-2", PermissionError(13, "Permission denied"))

    entries = scan(tmp_path)
    assert [(e.uri.rsplit("/", 1)[-1], e.status) for e in entries] == [
        ("step-1", COMMITTED),
        ("step-2", UNREADABLE),
    ]
    assert "Permission denied" in (entries[1].error or "")
    with caplog.at_level(logging.WARNING):
        found = torchstow.list_checkpoints(tmp_path)
    assert [i.step for i in found] == [1]
    assert any("step-2" in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)


def test_a_transient_storage_error_fails_both_rather_than_hide_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (1, 2):
        torchstow.save({"w": torch.full((2,), float(step))}, tmp_path / f"step-{step}")
    _failing_reads(monkeypatch, tmp_path / "step-2", StorageIOError("throttled", attempts=5, transient=True))

    with pytest.raises(StorageIOError, match="throttled"):
        scan(tmp_path)
    with pytest.raises(StorageIOError, match="throttled"):
        torchstow.latest(tmp_path)
