"""What verify and copy say about a data file cut short: how many bytes, and in which file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.format.files import is_data_file


def _data_file(ckpt: str) -> str:
    (name,) = [n for n in os.listdir(ckpt) if is_data_file(n)]
    return os.path.join(ckpt, name)


@pytest.fixture
def truncated(tmp_path: Path) -> tuple[str, str, int]:
    """A checkpoint of one 24 MiB tensor whose data file lost its last 20 MiB (over several
    read segments); returns the checkpoint, its data file's name and the bytes cut."""
    ckpt = str(tmp_path / "step-1")
    torchstow.save({"w": torch.zeros(6, 1 << 20)}, ckpt)
    path = _data_file(ckpt)
    cut = 20 << 20
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - cut)
    return ckpt, os.path.basename(path), cut


def test_verify_counts_every_missing_byte(truncated: tuple[str, str, int]) -> None:
    ckpt, name, cut = truncated
    (problem,) = torchstow.verify(ckpt).problems
    assert problem.file == name
    assert f"({cut:,} bytes missing)" in problem.message, problem.message


@pytest.mark.parametrize("in_kernel", [True, False], ids=["in-kernel", "through-memory"])
def test_copy_of_a_truncated_source_names_the_source_file_only(
    truncated: tuple[str, str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_kernel: bool
) -> None:
    ckpt, name, cut = truncated
    if not in_kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    dst = tmp_path / "copy"
    with pytest.raises(torchstow.ChecksumMismatchError) as caught:
        torchstow.copy(ckpt, str(dst))
    message = str(caught.value)
    assert name in message and f"({cut:,} bytes missing)" in message, message
    assert str(dst) not in message.split("; nothing was committed at")[0], message
    assert not dst.exists() or os.listdir(dst) == []
