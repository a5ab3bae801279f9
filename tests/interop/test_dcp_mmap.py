"""read(mmap=True) of a stock DCP checkpoint: its chunks are torch.save blobs, not raw
bytes, so they are read and decoded as without mmap (not called corrupt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow
from torchstow.testing import assert_same_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.mark.parametrize("verify", [True, False])
def test_mmap_read_of_a_stock_dcp_checkpoint_reads_it(tmp_path: Path, verify: bool) -> None:
    state = {"model": {"w": torch.arange(12.0).reshape(4, 3), "b": torch.arange(5)}, "step": 7}
    path = str(tmp_path / "dcp")
    dcp.save(state, checkpoint_id=path, no_dist=True)
    assert_same_state(torchstow.read(path, mmap=True, verify=verify), torchstow.read(path))
    assert torch.equal(torchstow.read(path, mmap=True, keys=["model.w"])["model"]["w"], state["model"]["w"])
