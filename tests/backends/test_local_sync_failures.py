"""The local filesystem's syncs failing (EIO): a save whose data file or manifest could not
be made durable fails, rather than reporting a commit that may not survive a crash."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import torch

import torchstow
from torchstow import StorageIOError
from torchstow.backends import filesystem
from torchstow.backends.filesystem import LocalFileStore


def _eio(*_: Any) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_abort_after_a_failed_close_leaves_the_next_file_opened_alone(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStore(str(tmp_path), str(tmp_path))
    sink = store.create("data-x-0-0.bin")
    sink.write([b"abc"])
    monkeypatch.setattr(os, "fsync", _eio)
    with pytest.raises(StorageIOError, match=r"syncing .*data-x-0-0\.bin failed \(Input/output error\)"):
        sink.close()
    monkeypatch.undo()
    # The failed close closed its descriptor; the next file opened may get its number.
    other = os.open(tmp_path / "user.txt", os.O_WRONLY | os.O_CREAT)
    try:
        sink.abort()  # the writer's cleanup after the failed close
        os.fstat(other)  # still open: abort closed nothing but its own (EBADF before)
    finally:
        os.close(other)
    assert sorted(os.listdir(tmp_path)) == ["user.txt"]


def test_a_data_file_sync_failing_fails_the_save_with_its_cause(
    ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("data-"):
            _eio()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageIOError, match="Input/output error") as info:
        torchstow.save({"w": torch.ones(8)}, ckpt)
    assert "Bad file descriptor" not in str(info.value)  # the cleanup masked the cause before
    assert os.listdir(ckpt) == []  # nothing committed, the data file removed


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_manifest_whose_directory_sync_fails_is_no_successful_save(
    ckpt: str, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    manifest = os.path.join(ckpt, "manifest.json")
    if overwrite:
        torchstow.save({"w": torch.zeros(8)}, ckpt)
    old = set(os.listdir(ckpt)) if overwrite else set()
    old_inode = os.stat(manifest).st_ino if overwrite else None
    real = filesystem._fsync_dir

    def fsync_dir(path: str) -> None:
        # Fails once the new manifest is in place (not for the chunk table before it).
        if os.path.exists(manifest) and os.stat(manifest).st_ino != old_inode:
            _eio()
        real(path)

    monkeypatch.setattr(filesystem, "_fsync_dir", fsync_dir)
    with pytest.raises(StorageIOError, match="not durable") as info:
        torchstow.save({"w": torch.ones(8)}, ckpt, overwrite=overwrite)
    assert "Input/output error" in str(info.value)
    # Unknown outcome: every file is kept, the replaced checkpoint's too (they went before).
    assert old <= set(os.listdir(ckpt))
    monkeypatch.undo()
    assert torch.equal(torchstow.read(ckpt)["w"], torch.ones(8))  # what is visible loads
