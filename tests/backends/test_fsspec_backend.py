"""The fsspec backend beyond S3: any protocol through fsspec+<protocol>://, options
passed through, and clear errors for what it cannot serve."""

from __future__ import annotations

import gc
import io
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

import torchstow
from torchstow.backends.fsspec import FsspecBackend


def test_any_fsspec_protocol_through_the_wrapper_scheme(tmp_path: Path) -> None:
    prefix = f"fsspec+file://{tmp_path}/run"
    torchstow.save({"w": torch.arange(10)}, f"{prefix}/step-1")
    torchstow.save({"w": torch.arange(20)}, f"{prefix}/step-2")
    assert (tmp_path / "run" / "step-2" / "manifest.json").is_file()
    assert torchstow.latest(prefix) == f"{prefix}/step-2"
    assert torch.equal(torchstow.read(f"{prefix}/step-1")["w"], torch.arange(10))
    torchstow.delete(f"{prefix}/step-2")
    assert not (tmp_path / "run" / "step-2").exists()
    assert torchstow.latest(prefix) == f"{prefix}/step-1"


def test_filesystem_options_reach_fsspec(tmp_path: Path) -> None:
    uri = f"fsspec+file://{tmp_path}/c"
    backend = FsspecBackend(auto_mkdir=False, thread_count=2)
    fs = backend.open_store(uri).fs
    assert fs.auto_mkdir is False  # an fsspec option
    assert backend.thread_count == 2  # one of torchstow's
    assert FsspecBackend(auto_mkdir=False).open_store(uri).fs is fs  # built once per options
    assert FsspecBackend(auto_mkdir=True).open_store(uri).fs is not fs


def test_an_unknown_fsspec_protocol_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        ImportError, match="'fsspec\\+nosuchfs://x/y' needs the fsspec implementation of 'nosuchfs'"
    ):
        torchstow.save({}, "fsspec+nosuchfs://x/y")


@pytest.mark.parametrize(
    "option",
    [
        {"part_size": 1 << 20},
        {"part_size": 6 << 30},  # S3 refuses every part over 5 GiB
        {"multipart_threshold": 6 << 30},  # ... and every PUT: a 6 GiB file failed once sent
        {"multipart_threshold": -1},
        {"concurrency": 0},
        {"retry_attempts": 0},
    ],
)
def test_bad_tuning_options_are_refused(option: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        torchstow.save({}, "memory://bad/options", storage_options=option)


def test_an_overwrite_cut_short_in_its_manifest_write_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsspec+file:// wrote manifest.json in place: a write cut short (a signal handler raising,
    # a full disk) left it torn, and the replaced checkpoint, still whole, no longer loaded
    uri = f"fsspec+file://{tmp_path}/step-1"
    torchstow.save({"w": torch.arange(10)}, uri)
    write = LocalFileOpener.write

    def torn(self: LocalFileOpener, data: Any) -> Any:
        if "manifest.json" in self.path:
            write(self, bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt
        return write(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", torn)
    with pytest.raises((KeyboardInterrupt, torchstow.CheckpointException)):
        torchstow.save({"w": torch.arange(20)}, uri, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(torchstow.read(uri)["w"], torch.arange(10))
    assert not [p.name for p in (tmp_path / "step-1").iterdir() if p.name.endswith(".tmp")]


class _UploadingFile(AbstractBufferedFile):
    """A file written as a remote store's (gcsfs, adlfs ...) are: in blocks, the object
    appearing at close; the first block of a data file fails, as a dropped connection would."""

    def _initiate_upload(self) -> None:
        self.blocks: list[bytes] = []

    def _upload_chunk(self, final: bool = False) -> bool:
        if not final and "/data-" in self.path and not self.fs.failed:
            self.fs.failed = True
            raise ConnectionResetError("the connection dropped mid-upload")
        self.blocks.append(self.buffer.getvalue())
        if final:
            self.fs.objects[self.path] = b"".join(self.blocks)
        return True


class _UploadingFileSystem(AbstractFileSystem):
    protocol = "uploading"

    def __init__(self, tag: str = "", **kwargs: Any) -> None:  # (tag: an instance of its own)
        super().__init__(**kwargs)
        self.objects: dict[str, bytes] = {}
        self.failed = False

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            return _UploadingFile(self, path, mode, block_size=64 << 10)
        if path not in self.objects:
            raise FileNotFoundError(path)
        return io.BytesIO(self.objects[path])

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        prefix = f"{path.rstrip('/')}/"
        names = sorted(p for p in self.objects if p.startswith(prefix) and "/" not in p[len(prefix) :])
        return [{"name": p, "type": "file", "size": len(self.objects[p])} for p in names]

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def rm_file(self, path: str) -> None:
        if self.objects.pop(path, None) is None:
            raise FileNotFoundError(path)


def test_a_failed_save_leaves_no_file_a_buffered_filesystem_uploads_later() -> None:
    # a data file's upload fails mid-way on a filesystem whose files upload at close (as
    # gcsfs's and adlfs's do); before, the aborted file was discarded but left open, and when
    # it was collected its finalizer closed it, uploading what it held after the cleanup: a
    # data file no manifest names
    fsspec.register_implementation("uploading", _UploadingFileSystem, clobber=True)
    uri, options = "fsspec+uploading://run/s", {"tag": uuid.uuid4().hex, "thread_count": 1}
    try:
        torchstow.save({"w": torch.randn(1 << 18)}, uri, storage_options=options)
    except torchstow.CheckpointException:
        pass
    else:
        pytest.fail("the save did not fail")
    gc.collect()
    fs = FsspecBackend(**options).open_store(uri).fs  # the instance the save used
    assert fs.failed and not [p for p in fs.objects if "/data-" in p]
