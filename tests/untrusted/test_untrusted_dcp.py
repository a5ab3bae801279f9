"""A DCP-format checkpoint from someone else: its .metadata is held to the same rules as a
torchstow manifest - plain file names, sane shapes, chunks that tile, locations inside files."""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def stock(tmp_path: Path) -> str:
    path = str(tmp_path / "step-1")
    dcp.save({"w": torch.arange(12.0).reshape(4, 3), "step": 1}, checkpoint_id=path, no_dist=True)
    return path


def rewrite(path: str, change: Callable[[Any], None]) -> None:
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # the test's own file: trusted here
    change(metadata)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def location_of(metadata: Any, fqn: str) -> tuple[Any, Any]:
    return next((index, info) for index, info in metadata.storage_data.items() if index.fqn == fqn)


def set_info(metadata: Any, fqn: str, **changes: Any) -> None:
    index, info = location_of(metadata, fqn)
    metadata.storage_data[index] = dataclasses.replace(info, **changes)


def assert_refused(path: str, *patterns: str) -> None:
    for call in (
        lambda: torchstow.read(path),
        lambda: torchstow.load({"w": torch.zeros(4, 3), "step": 0}, path),
    ):
        with pytest.raises(torchstow.CorruptCheckpointError) as info:
            call()
        for pattern in patterns:
            assert pattern in str(info.value), str(info.value)


def test_the_stock_checkpoint_reads(stock: str) -> None:
    assert torch.equal(torchstow.read(stock)["w"], torch.arange(12.0).reshape(4, 3))


@pytest.mark.parametrize("name", ["..", "../secret.distcp", "/etc/passwd", ""])
def test_a_file_name_outside_the_checkpoint(stock: str, name: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", relative_path=name))
    assert_refused(stock, "'w'", "not a plain file name")


def test_a_claim_larger_than_the_file_is_refused_before_allocating(stock: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", length=20 * 10**9))
    assert_refused(stock, "'w'", "truncated or the manifest is wrong")


def test_a_chunk_in_fewer_bytes_than_its_elements(stock: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", length=8))
    assert_refused(stock, "'w'", "cannot hold a chunk")


def test_a_negative_offset(stock: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", offset=-10))
    assert_refused(stock, "'w'", "offset is -10")


def test_a_negative_and_a_huge_shape(stock: str) -> None:
    def shape(size: list[int]) -> Callable[[Any], None]:
        def change(md: Any) -> None:
            entry = md.state_dict_metadata["w"]
            entry.size = torch.Size(size)
            entry.chunks[0] = dataclasses.replace(entry.chunks[0], sizes=torch.Size(size))

        return change

    rewrite(stock, shape([-4, 3]))
    assert_refused(stock, "'w'", "outside 0..")
    rewrite(stock, shape([10**6, 10**6]))
    assert_refused(stock, "'w'", "cannot hold a chunk")


def test_chunks_with_a_gap(stock: str) -> None:
    def gap(md: Any) -> None:
        entry = md.state_dict_metadata["w"]
        entry.chunks[0] = dataclasses.replace(entry.chunks[0], sizes=torch.Size([3, 3]))

    rewrite(stock, gap)
    assert_refused(stock, "'w'", "cover 9 elements of the 12")
