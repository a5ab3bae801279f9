"""Global planning is linear in the number of chunks: no pairwise overlap checks,
and replicated items are spread over the ranks (4 ranks x 5,000 tensors)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchstow.core.planning import (
    DefaultSavePlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torchstow.core.planning.save_planner import dedup_save_plans
from torchstow.format import chunks as chunk_math
from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, TensorProperties

RANKS = 4
TENSORS = 5_000
PROPS = TensorProperties(torch.float32)


def _shard_plans(size: tuple[int, int] = (8, 16)) -> list[SavePlan]:
    """Every rank's plan for ``TENSORS`` tensors sharded by rows over ``RANKS`` ranks."""
    rows = size[0] // RANKS
    plans = []
    for rank in range(RANKS):
        chunk = ChunkStorageMetadata(torch.Size((rank * rows, 0)), torch.Size((rows, size[1])))
        data = TensorWriteData(chunk, PROPS, torch.Size(size))
        items = [
            WriteItem(MetadataIndex(f"t{i}", chunk.offsets), WriteItemType.SHARD, data)
            for i in range(TENSORS)
        ]
        plans.append(SavePlan(items))
    return plans


@pytest.fixture
def counted_cells(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the grid cells and slabs validation examines, and forbids pairwise overlap tests."""
    visited = [0]
    cells = chunk_math._cells
    slab = chunk_math._slab

    def counting(span: list[tuple[int, int]]) -> list[tuple[int, ...]]:
        out = cells(span)
        visited[0] += len(out)
        return out

    def counting_slabs(*args: Any) -> Any:
        visited[0] += 1
        return slab(*args)

    def no_pairwise(*args: object) -> None:
        raise AssertionError("validation compared two chunks pairwise")

    monkeypatch.setattr(chunk_math, "_cells", counting)
    monkeypatch.setattr(chunk_math, "_slab", counting_slabs)
    monkeypatch.setattr(chunk_math, "overlap", no_pairwise)
    return visited


def test_global_plan_examines_each_chunk_at_most_once(counted_cells: list[int]) -> None:
    plans, metadata = DefaultSavePlanner().create_global_plan(_shard_plans())
    # each rank's shards share one chunk object, examined once for all tensors
    assert counted_cells[0] == RANKS
    assert [len(plan.items) for plan in plans] == [TENSORS] * RANKS
    assert len(metadata.state_dict_metadata["t0"].chunks) == RANKS  # type: ignore[union-attr]


def test_one_tensor_of_many_chunks_is_validated_linearly(counted_cells: list[int]) -> None:
    n = 4096
    chunks = [ChunkStorageMetadata(torch.Size((i, 0)), torch.Size((1, 3))) for i in range(n)]
    chunk_math.validate_cover("t", torch.Size((n, 3)), chunks)
    assert counted_cells[0] == n


@pytest.mark.parametrize(
    ("offsets", "sizes", "message"),
    [
        ([0, 2, 3], [2, 3, 2], "overlap"),
        ([0, 3, 6], [3, 3, 2], "lies outside"),
        ([0, 2, 5], [2, 2, 2], "leave gaps"),
        ([2, 0, 4], [2, 2, 2], None),  # slabs in any order
    ],
)
def test_linear_validation_still_catches_bad_covers(
    offsets: list[int], sizes: list[int], message: str | None
) -> None:
    chunks = [ChunkStorageMetadata(torch.Size((o,)), torch.Size((s,))) for o, s in zip(offsets, sizes)]
    if message is None:
        chunk_math.validate_cover("t", torch.Size((6,)), chunks)
        return
    with pytest.raises(ValueError, match=message):
        chunk_math.validate_cover("t", torch.Size((7,)), chunks)


def test_slabs_along_an_inner_dimension_are_checked_too() -> None:
    cols = [ChunkStorageMetadata(torch.Size((0, c)), torch.Size((4, 2))) for c in (0, 2, 4)]
    chunk_math.validate_cover("t", torch.Size((4, 6)), cols)
    with pytest.raises(ValueError, match="leave gaps"):
        chunk_math.validate_cover("t", torch.Size((4, 6)), cols[:1] + cols[2:])
    short = [*cols[:2], ChunkStorageMetadata(torch.Size((1, 4)), torch.Size((3, 2)))]
    with pytest.raises(ValueError, match="leave gaps"):
        chunk_math.validate_cover("t", torch.Size((4, 6)), short)


def test_replicated_items_are_spread_by_bytes_then_count() -> None:
    whole = ChunkStorageMetadata(torch.Size((0,)), torch.Size((256,)))
    data = TensorWriteData(whole, PROPS, torch.Size((256,)))
    tensors = [WriteItem(MetadataIndex(f"w{i}", whole.offsets), WriteItemType.TENSOR, data) for i in range(8)]
    objects = [WriteItem(MetadataIndex(f"o{i}"), WriteItemType.BYTE_IO) for i in range(8)]
    plans = dedup_save_plans([SavePlan(tensors + objects) for _ in range(RANKS)])
    for plan in plans:
        assert sum(item.type == WriteItemType.TENSOR for item in plan.items) == 2
        assert sum(item.type == WriteItemType.BYTE_IO for item in plan.items) == 2
    kept = [item.index for plan in plans for item in plan.items]
    assert len(kept) == len(set(kept)) == 16
