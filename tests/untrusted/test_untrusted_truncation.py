"""A data file cut short: the keys wholly inside what is left still read, as they do
when a checksum fails elsewhere; each key that reaches past the end is an error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchstow


def _saved(path: Path) -> Path:
    torchstow.save({"a": torch.arange(10.0), "m": {"n": torch.arange(5)}, "b": torch.arange(1000.0)}, path)
    return path


def _data_file(path: Path) -> Path:
    (name,) = [p for p in path.iterdir() if p.name.startswith("data-")]
    return name


@pytest.mark.parametrize("cut", [1, 2000])
def test_a_subset_read_of_a_truncated_file_salvages_the_intact_keys(tmp_path: Path, cut: int) -> None:
    path = _saved(tmp_path / "ckpt")
    data = _data_file(path)
    os.truncate(data, data.stat().st_size - cut)
    got = torchstow.read(path, keys=["a", "m"])
    assert torch.equal(got["a"], torch.arange(10.0))
    assert torch.equal(got["m"]["n"], torch.arange(5))
    target = {"a": torch.zeros(10), "m": {"n": torch.zeros(5, dtype=torch.int64)}}
    torchstow.load(target, path)
    assert torch.equal(target["a"], torch.arange(10.0))
    for call in (lambda: torchstow.read(path, keys=["b"]), lambda: torchstow.read(path)):
        with pytest.raises(torchstow.CorruptCheckpointError, match=r"'b'.*truncated"):
            call()
