"""The fsspec backend beyond S3: any protocol through fsspec+<protocol>://, options
passed through, and clear errors for what it cannot serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fsspec.implementations.local import LocalFileOpener

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
