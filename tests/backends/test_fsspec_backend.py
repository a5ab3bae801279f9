"""The fsspec backend beyond S3: any protocol through fsspec+<protocol>://, options
passed through, and clear errors for what it cannot serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("option", [{"part_size": 1 << 20}, {"concurrency": 0}, {"retry_attempts": 0}])
def test_bad_tuning_options_are_refused(option: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be"):
        torchstow.save({}, "memory://bad/options", storage_options=option)
