"""dcp.save through torchstow's writer into s3:// (moto server) and shm://, then
torchstow.load and dcp.load of the result; a stock DCP checkpoint on s3:// read by torchstow."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow

from storage_helpers import s3_options, unique

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _roundtrip(uri: str, options: dict[str, Any]) -> None:
    state = {"w": torch.randn(64, 32), "step": 9}
    dcp.save(state, storage_writer=torchstow.dcp_storage_writer(uri, storage_options=options), no_dist=True)
    assert torchstow.info(uri, storage_options=options).num_entries == 2
    mine: dict[str, Any] = {"w": torch.zeros(64, 32), "step": 0}
    torchstow.load(mine, uri, storage_options=options)
    assert torch.equal(mine["w"], state["w"])
    assert mine["step"] == 9
    theirs: dict[str, Any] = {"w": torch.zeros(64, 32), "step": 0}
    dcp.load(theirs, storage_reader=torchstow.dcp_storage_reader(uri, storage_options=options), no_dist=True)
    assert torch.equal(theirs["w"], state["w"])
    assert theirs["step"] == 9


def test_dcp_save_into_s3(s3_endpoint: str, s3_bucket: str) -> None:
    _roundtrip(f"s3://{s3_bucket}/{unique()}/step-1", s3_options(s3_endpoint))


def test_dcp_save_into_shm(shm_dir: str) -> None:
    _roundtrip("shm://run/step-1", {"shm_dir": shm_dir})
    assert os.listdir(os.path.join(shm_dir, "run", "step-1"))


def test_stock_dcp_checkpoint_on_s3_is_read(s3_endpoint: str, s3_bucket: str) -> None:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    prefix = f"s3://{s3_bucket}/{unique()}"
    uri = f"{prefix}/step-3"
    options = s3_options(s3_endpoint)
    fs_options = {"key": options["key"], "secret": options["secret"], "endpoint_url": s3_endpoint}
    state = {"w": torch.randn(16, 8), "step": 3}
    dcp.save(state, storage_writer=FsspecWriter(uri, sync_files=False, **fs_options), no_dist=True)
    back = torchstow.read(uri, storage_options=options)
    assert torch.equal(back["w"], state["w"])
    assert back["step"] == 3
    assert torchstow.info(uri, storage_options=options).num_entries == 2
    assert torchstow.latest(prefix, storage_options=options) == uri
