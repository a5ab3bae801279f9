"""read(mmap=True) of a checkpoint that ranks saved in shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from dist_scenarios import _arange_2d, big_save

import torchstow


def test_a_sharded_tensor_is_assembled_from_its_mapped_chunks(pools: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "sharded")
    pools(2).run(big_save, path, 64, 32)
    got = torchstow.read(path, mmap=True)
    assert torch.equal(got["big"], _arange_2d(64, 32))
