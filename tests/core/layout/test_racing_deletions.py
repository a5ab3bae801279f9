"""No cleanup removes a file that another writer's manifest lists, committed or about to be:
the loser of two racing incremental saves to one name, and copy's housekeeping after
its commit next to a save in flight. A file that another process removes while the
directory is listed is not taken for the checkpoint's own files missing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout.writer import LayoutWriter


def _state(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"kept": torch.randn(4096, generator=gen), "moved": torch.randn(256, generator=gen)}


def _assert_loads(uri: Path, expected: dict[str, Any]) -> None:
    got = torchstow.read(str(uri))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _before_first_commit(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    """Run ``action`` once, when the first save to commit has written all its data."""
    original = LayoutWriter.finish
    pending = [action]

    def finish(self: LayoutWriter, *args: Any) -> None:
        if pending:
            pending.pop()()
        original(self, *args)

    monkeypatch.setattr(LayoutWriter, "finish", finish)


def test_the_loser_of_racing_incremental_saves_keeps_the_winners_shared_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, target = tmp_path / "step-1", tmp_path / "step-2"
    torchstow.save(_state(1), str(base))
    winner = {"kept": _state(1)["kept"], "moved": _state(2)["moved"]}
    loser = {"kept": _state(1)["kept"], "moved": _state(3)["moved"]}
    # Both link step-1's data file into step-2; the winner commits while the loser is in flight.
    _before_first_commit(monkeypatch, lambda: torchstow.save(winner, str(target), base=str(base)))
    with pytest.raises(torchstow.CheckpointExistsError):
        torchstow.save(loser, str(target), base=str(base))
    _assert_loads(target, winner)
    _assert_loads(base, _state(1))


def test_copy_removes_only_the_files_of_the_checkpoint_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    torchstow.save(_state(1), str(src))
    torchstow.save(_state(2), str(dst))
    old = set(os.listdir(dst)) - {"manifest.json"}
    # A save in flight at dst has written its data when the copy commits there.
    copied: list[set[str]] = []

    def copy_now() -> None:
        before = set(os.listdir(dst))
        torchstow.copy(str(src), str(dst), overwrite=True)
        copied.append(set(os.listdir(dst)) - before)

    _before_first_commit(monkeypatch, copy_now)
    torchstow.save(_state(3), str(dst), overwrite=True)
    _assert_loads(dst, _state(3))
    assert not old & set(os.listdir(dst))  # the checkpoint the copy replaced: removed
    assert not copied[0] & set(os.listdir(dst))  # the copy's, replaced by the save: removed


def test_copy_without_overwrite_loses_to_a_save_that_committed_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    torchstow.save(_state(1), str(src))
    # The copy has written its data; a save to dst commits before the copy's manifest does.
    pending = [lambda: torchstow.save(_state(3), str(dst))]
    for name in ("publish", "publish_new"):
        original = getattr(LocalFileStore, name)

        def publish(self: LocalFileStore, *args: Any, _original: Any = original) -> None:
            if pending:
                pending.pop()()
            _original(self, *args)

        monkeypatch.setattr(LocalFileStore, name, publish)
    with pytest.raises(torchstow.CheckpointExistsError):
        torchstow.copy(str(src), str(dst))
    _assert_loads(dst, _state(3))
    listed = set(json.loads((dst / "manifest.json").read_text())["files"])
    assert {f for f in os.listdir(dst) if f.startswith("data-")} == listed  # the copy's are gone


def test_a_commit_whose_outcome_is_unknown_keeps_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest landed, but the store reported a failure and reading it back failed
    too: the save fails saying the outcome is unknown, and keeps the files it names."""
    uri = tmp_path / "ckpt"
    original = LocalFileStore.publish_new

    def publish_new(self: LocalFileStore, name: str, data: bytes) -> None:
        original(self, name, data)
        monkeypatch.setattr(LocalFileStore, "read_file", lambda *_: (_ for _ in ()).throw(OSError("EIO")))
        raise OSError("the reply was lost")

    monkeypatch.setattr(LocalFileStore, "publish_new", publish_new)
    with pytest.raises(torchstow.CheckpointException, match="the outcome is unknown"):
        torchstow.save(_state(1), str(uri))
    monkeypatch.undo()
    _assert_loads(uri, _state(1))


def test_an_incremental_overwrite_whose_shared_files_were_removed_meanwhile_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save onto its own base shares the base's files by name; another overwrite that
    commits while it is in flight removes them. The first save must not then commit a
    manifest that names them: it fails, and the other's checkpoint stays whole."""
    uri = tmp_path / "ckpt"
    torchstow.save(_state(1), str(uri))
    incremental = {"kept": _state(1)["kept"], "moved": _state(2)["moved"]}
    _before_first_commit(monkeypatch, lambda: torchstow.save(_state(3), str(uri), overwrite=True))
    with pytest.raises(torchstow.CheckpointException, match="nothing was committed"):
        torchstow.save(incremental, str(uri), base=str(uri), overwrite=True)
    _assert_loads(uri, _state(3))
    listed = set(json.loads((uri / "manifest.json").read_text())["files"])
    assert {f for f in os.listdir(uri) if f.startswith("data-")} == listed  # the failed save's are gone


def _a_file_vanishes_in_every_listing(monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[str]:
    """Each listing of ``directory`` names a file that is gone by the time its entries are
    looked at, as when another rank's checkpointer takes its message (or a manifest's
    temporary file is renamed) meanwhile; the names it removed."""
    real = os.scandir
    removed: list[str] = []

    class Listing:
        def __init__(self, path: Any) -> None:
            stray = directory / ".torchstow-exchange-w1-3-0-1"
            stray.write_bytes(b"message")
            with real(path) as entries:
                self.entries = list(entries)
            stray.unlink()
            removed.append(stray.name)

        def __enter__(self) -> Any:
            return iter(self.entries)

        def __exit__(self, *exc: object) -> None:
            return None

    def scandir(path: Any = ".") -> Any:
        return Listing(path) if Path(path) == directory else real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return removed


def test_a_file_removed_while_the_directory_is_listed_is_no_missing_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks of a checkpointer remove their messages next to the data while another rank
    loads: the load still finds every data file there, and so does a commit's check."""
    uri = tmp_path / "ckpt"
    torchstow.save(_state(1), str(uri))
    removed = _a_file_vanishes_in_every_listing(monkeypatch, uri)
    _assert_loads(uri, _state(1))  # it read a data file "missing, though the committed manifest lists it"
    torchstow.save(_state(2), str(uri), overwrite=True)  # it committed nothing: "removed while in flight"
    _assert_loads(uri, _state(2))
    assert removed  # the listings did meet a vanishing file
