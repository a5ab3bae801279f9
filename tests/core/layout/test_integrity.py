"""Atomic commit, safe overwrite, checksums, and every way a checkpoint can be broken."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any, ClassVar

import pytest
import torch

import torchstow
from manifest_json import manifest_doc
from torchstow.core.layout.writer import LayoutWriter
from torchstow.core.planning import DefaultSavePlanner, SavePlan, SavePlanner, WriteItem

from waits import wait_until


class Opaque:
    """A class torch.load(weights_only=True) refuses to rebuild."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value


def data_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".bin"))


def manifest(path: str) -> dict[str, Any]:
    return manifest_doc(path)


def test_saving_onto_a_checkpoint_needs_overwrite(ckpt: str) -> None:
    torchstow.save({"x": torch.ones(2)}, ckpt)
    with pytest.raises(torchstow.CheckpointExistsError, match="pass overwrite=True") as info:
        torchstow.save({"x": torch.zeros(2)}, ckpt)
    assert isinstance(info.value, FileExistsError)
    assert torch.equal(torchstow.read(ckpt)["x"], torch.ones(2))


def test_overwrite_replaces_and_cleans_up(ckpt: str) -> None:
    torchstow.save({"x": torch.ones(2)}, ckpt)
    old_files = data_files(ckpt)
    torchstow.save({"x": torch.full((2,), 7.0), "y": torch.ones(1)}, ckpt, overwrite=True)
    assert torch.equal(torchstow.read(ckpt)["x"], torch.full((2,), 7.0))
    new_files = data_files(ckpt)
    assert not set(old_files) & set(new_files)
    assert set(new_files) == {manifest(ckpt)["files"][0]}


class CheckOldStillValidWriter(LayoutWriter):
    """Before committing, check the old checkpoint is still whole and loadable."""

    seen: ClassVar[dict[str, Any]] = {}

    def finish(self, metadata: Any, results: Any) -> None:
        self.seen.update(torchstow.read(self.store.location))
        super().finish(metadata, results)


def test_overwrite_keeps_the_old_checkpoint_valid_until_commit(ckpt: str) -> None:
    torchstow.save({"x": torch.ones(2)}, ckpt)
    store = torchstow.storage_writer(ckpt).store  # type: ignore[attr-defined]
    writer = CheckOldStillValidWriter(store, overwrite=True)
    torchstow.save({"x": torch.full((2,), 5.0)}, storage_writer=writer)
    assert torch.equal(CheckOldStillValidWriter.seen["x"], torch.ones(2))
    assert torch.equal(torchstow.read(ckpt)["x"], torch.full((2,), 5.0))


class FailingPlanner(DefaultSavePlanner):
    """Fails while resolving one key, after other items were written."""

    def resolve_data(self, write_item: WriteItem) -> Any:
        if write_item.index.fqn == "boom":
            raise ValueError("cannot produce 'boom'")
        return super().resolve_data(write_item)


def test_failed_overwrite_leaves_the_old_checkpoint(ckpt: str) -> None:
    torchstow.save({"x": torch.ones(2), "boom": torch.ones(1)}, ckpt)
    before = manifest(ckpt)
    with pytest.raises(torchstow.CheckpointException) as info:
        torchstow.save(
            {"x": torch.zeros(2), "boom": torch.zeros(1)}, ckpt, overwrite=True, planner=FailingPlanner()
        )
    assert set(info.value.failures) == {0}
    exc, stack = info.value.failures[0]
    assert isinstance(exc, ValueError) and "boom" in str(exc)
    assert any("resolve_data" in frame.name for frame in stack)
    assert "rank 0: ValueError" in str(info.value)
    assert manifest(ckpt) == before
    assert torch.equal(torchstow.read(ckpt)["x"], torch.ones(2))
    assert data_files(ckpt) == before["files"]  # the failed attempt removed what it wrote


def test_failed_first_save_commits_nothing(ckpt: str) -> None:
    with pytest.raises(torchstow.CheckpointException):
        torchstow.save({"x": torch.ones(2), "boom": torch.ones(1)}, ckpt, planner=FailingPlanner())
    # The writer removed the file it was writing: no debris, no checkpoint.
    assert os.listdir(ckpt) == []
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.read(ckpt)


class FailedFutureWriter(LayoutWriter):
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_exception(OSError(28, "No space left on device"))
        return future


def test_a_failed_write_future_fails_the_save(ckpt: str) -> None:
    store = torchstow.storage_writer(ckpt).store  # type: ignore[attr-defined]
    with pytest.raises(torchstow.CheckpointException) as info:
        torchstow.save({"x": torch.ones(1)}, storage_writer=FailedFutureWriter(store))
    assert isinstance(info.value.failures[0][0], OSError)
    assert "No space left" in str(info.value)
    assert not os.path.exists(os.path.join(ckpt, "manifest.json"))


def test_flipped_byte_is_a_checksum_mismatch_naming_key_and_file(ckpt: str) -> None:
    torchstow.save({"a": torch.zeros(1000), "b": torch.arange(1000.0)}, ckpt)
    doc = manifest(ckpt)
    entry = doc["entries"]["b"]
    path = os.path.join(ckpt, doc["files"][entry["file"]])
    with open(path, "r+b") as f:
        f.seek(entry["offset"] + 123)
        byte = f.read(1)
        f.seek(entry["offset"] + 123)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(torchstow.ChecksumMismatchError) as info:
        torchstow.load({"a": torch.zeros(1000), "b": torch.zeros(1000)}, ckpt)
    message = str(info.value)
    assert "'b'" in message and doc["files"][entry["file"]] in message
    assert isinstance(info.value, torchstow.CorruptCheckpointError)
    # Other keys are intact; verification can be turned off knowingly.
    assert torch.equal(torchstow.read(ckpt, keys=["a"])["a"], torch.zeros(1000))
    unchecked = torchstow.read(ckpt, keys=["b"], storage_options={"verify_checksums": False})["b"]
    assert (unchecked != torch.arange(1000.0)).sum() == 1


def test_flipped_byte_in_a_large_item_is_found_in_its_block(ckpt: str) -> None:
    big = torch.randn(3 << 20)  # 12 MiB: three checksum blocks
    torchstow.save({"big": big}, ckpt)
    doc = manifest(ckpt)
    entry = doc["entries"]["big"]
    assert len(entry["crc32c"]) == 3
    path = os.path.join(ckpt, doc["files"][entry["file"]])
    with open(path, "r+b") as f:
        f.seek(entry["offset"] + (9 << 20))
        f.write(b"\xff\xff")
    with pytest.raises(torchstow.ChecksumMismatchError, match="'big'"):
        torchstow.read(ckpt)


def test_a_flipped_byte_among_items_read_in_parallel_names_its_key(ckpt: str) -> None:
    state = {f"w{i}": torch.full((10 << 20,), float(i)) for i in range(6)}  # 40 MiB each: a job each
    torchstow.save(state, ckpt, storage_options={"thread_count": 2})
    doc = manifest(ckpt)
    entry = doc["entries"]["w4"]
    path = os.path.join(ckpt, doc["files"][entry["file"]])
    with open(path, "r+b") as f:
        f.seek(entry["offset"] + (33 << 20) + 5)
        f.write(b"\x7f")
    targets = {key: torch.zeros(10 << 20) for key in state}
    with pytest.raises(torchstow.ChecksumMismatchError, match="'w4'"):
        torchstow.load(targets, ckpt, storage_options={"thread_count": 2})


def test_truncated_data_file(ckpt: str) -> None:
    torchstow.save({"a": torch.arange(100.0)}, ckpt)
    path = os.path.join(ckpt, data_files(ckpt)[0])
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(torchstow.CorruptCheckpointError, match="truncated"):
        torchstow.read(ckpt)


def test_unreadable_manifest(ckpt: str) -> None:
    torchstow.save({"a": torch.ones(1)}, ckpt)
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        f.write('{"format": "torchstow", "version": 1, "entr')
    with pytest.raises(torchstow.CorruptCheckpointError, match="not valid JSON"):
        torchstow.info(ckpt)
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump({"format": "torchstow", "version": 1, "entries": {"a": {"dtype": "float32"}}}, f)
    with pytest.raises(torchstow.CorruptCheckpointError, match="malformed"):
        torchstow.read(ckpt)
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump({"some": "other json"}, f)
    with pytest.raises(torchstow.CorruptCheckpointError, match="not a torchstow manifest"):
        torchstow.read(ckpt)


def test_newer_format_version(ckpt: str) -> None:
    torchstow.save({"a": torch.ones(1)}, ckpt)
    doc = manifest(ckpt)
    doc["version"] = 99
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump(doc, f)
    with pytest.raises(torchstow.FormatVersionError, match=r"version 99.*upgrade torchstow"):
        torchstow.read(ckpt)


def test_missing_checkpoint(tmp_path: Any) -> None:
    missing = str(tmp_path / "nope")
    for call in (torchstow.read, torchstow.info, lambda uri: torchstow.load({"a": torch.ones(1)}, uri)):
        with pytest.raises(torchstow.CheckpointNotFoundError, match="no checkpoint at") as info:
            call(missing)
        assert isinstance(info.value, FileNotFoundError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.read(str(empty))


def test_manifest_never_unpickles(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    torchstow.save({"a": torch.ones(1), "n": 3, "t": (1, 2)}, ckpt)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the manifest path unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    info = torchstow.info(ckpt)
    assert info.num_entries == 3
    assert torchstow.read(ckpt, keys=["a", "n"])["n"] == 3


def test_pickle_is_gated_on_save_and_load(ckpt: str) -> None:
    with pytest.raises(torchstow.PickleNotAllowedError, match=r"obj: a Opaque .*allow_pickle=True"):
        torchstow.save({"obj": Opaque(3), "x": torch.ones(1)}, ckpt)
    assert not os.path.exists(os.path.join(ckpt, "manifest.json"))

    torchstow.save({"obj": Opaque(3), "x": torch.ones(1)}, ckpt, allow_pickle=True)
    assert manifest(ckpt)["entries"]["obj"]["encoding"] == "pickle"
    target = {"obj": None, "x": torch.zeros(1)}
    with pytest.raises(torchstow.PickleNotAllowedError, match="obj was saved with full pickle"):
        torchstow.load(target, ckpt)
    assert target == {"obj": None, "x": torch.zeros(1)}  # nothing was loaded
    with pytest.raises(torchstow.PickleNotAllowedError):
        torchstow.read(ckpt)
    torchstow.load(target, ckpt, allow_pickle=True)
    assert target["obj"] == Opaque(3)
    assert torchstow.read(ckpt, allow_pickle=True)["obj"] == Opaque(3)


CRASHING_SAVER = textwrap.dedent(
    """
    import sys, time, torch, torchstow
    from torchstow.core.planning import DefaultSavePlanner

    class Stall(DefaultSavePlanner):
        def resolve_data(self, item):
            if item.index.fqn == "stall":
                time.sleep(600)
            return super().resolve_data(item)

    state = {"big": torch.ones(4 << 20), "stall": torch.ones(1)}
    torchstow.save(state, sys.argv[1], planner=Stall(), storage_options={"thread_count": 1})
    """
)


@pytest.mark.slow
def test_killed_saver_leaves_an_incomplete_checkpoint_that_latest_skips(tmp_path: Any) -> None:
    root = tmp_path / "run"
    torchstow.save({"big": torch.zeros(4)}, str(root / "step-1"))
    target = str(root / "step-2")
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SAVER, target])

    def wrote_data() -> bool:
        assert proc.poll() is None, "the saver exited early"
        files = os.listdir(target) if os.path.isdir(target) else []
        return any(f.endswith(".bin") and os.path.getsize(os.path.join(target, f)) for f in files)

    try:
        wait_until(wrote_data, 120, "the saver to write data")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(torchstow.IncompleteCheckpointError, match=r"no committed manifest\.json"):
        torchstow.load({"big": torch.zeros(4 << 20), "stall": torch.zeros(1)}, target)
    assert torchstow.latest(str(root)) == str(root / "step-1")
    assert [i.uri for i in torchstow.list_checkpoints(str(root))] == [str(root / "step-1")]
    # Saving again over the debris works. The killed save's files stay: nothing tells them
    # from the files of a save still in flight, which a commit must never delete.
    debris = data_files(target)
    torchstow.save({"big": torch.ones(2)}, target)
    assert data_files(target) == sorted(debris + manifest(target)["files"])
    assert torch.equal(torchstow.read(target)["big"], torch.ones(2))
    torchstow.delete(target, force=True)  # removes the debris too (young: as if in flight)
    assert not os.path.exists(target)


def test_cleanup_trouble_after_the_commit_does_not_fail_the_save(
    ckpt: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torchstow.backends.filesystem import LocalFileStore

    torchstow.save({"x": torch.ones(2)}, ckpt)

    def refuse(self: LocalFileStore, names: Any) -> None:
        raise PermissionError("read-only directory")

    monkeypatch.setattr(LocalFileStore, "delete_files", refuse)
    torchstow.save({"x": torch.full((2,), 3.0)}, ckpt, overwrite=True)  # committed: no exception
    assert torch.equal(torchstow.read(ckpt)["x"], torch.full((2,), 3.0))
    assert "removing stale files failed" in caplog.text
