"""Planner internals: flattening, chunk geometry, partial reads, error aggregation."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import traceback

import pytest
import torch

import torchstow
import torchstow.planning
from manifest_json import manifest_doc
from torchstow.core.planning import DefaultLoadPlanner, LoadItemType, LoadPlan, ReadItem
from torchstow.errors import CheckpointException
from torchstow.format import chunks as chunk_math
from torchstow.format.codec import decode_metadata, encode_metadata
from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex
from torchstow.format.structure import build_nested, flatten_state_dict, set_leaf


def chunk(offsets: list[int], sizes: list[int]) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def test_validate_cover_accepts_a_grid_and_rejects_gaps_overlaps_and_strays() -> None:
    grid = [chunk([r, c], [2, 3]) for r in (0, 2) for c in (0, 3)]
    chunk_math.validate_cover("w", [4, 6], grid)
    uneven = [chunk([0], [3]), chunk([3], [3]), chunk([6], [1])]
    chunk_math.validate_cover("w", [7], uneven)
    with pytest.raises(ValueError, match="leave gaps"):
        chunk_math.validate_cover("w", [4, 6], grid[:3])
    with pytest.raises(ValueError, match="overlap"):
        chunk_math.validate_cover("w", [4, 6], [*grid, chunk([0, 0], [1, 1])])
    with pytest.raises(ValueError, match="outside the shape"):
        chunk_math.validate_cover("w", [4, 6], [chunk([3, 0], [2, 6])])
    with pytest.raises(ValueError, match="does not have 2 dimensions"):
        chunk_math.validate_cover("w", [4, 6], [chunk([0], [4])])
    # Same cell count, different cells: an overlap hidden by a gap.
    with pytest.raises(ValueError, match="overlaps another chunk"):
        chunk_math.validate_cover(
            "w", [2, 2], [chunk([0, 0], [1, 2]), chunk([0, 0], [1, 1]), chunk([1, 1], [1, 1])]
        )


def _split(rng: random.Random, offsets: list[int], sizes: list[int], depth: int) -> list[chunk_math.Box]:
    """A random exact tiling of a box: cut along a random dimension, each side cut again."""
    dims = [d for d, n in enumerate(sizes) if n > 1]
    if not dims or depth == 0 or rng.random() < 0.2:
        return [(offsets, sizes, math.prod(sizes))]
    d = rng.choice(dims)
    cut = rng.randint(1, sizes[d] - 1)
    left, right = sizes.copy(), sizes.copy()
    left[d], right[d] = cut, sizes[d] - cut
    moved = offsets.copy()
    moved[d] += cut
    return _split(rng, offsets, left, depth - 1) + _split(rng, moved, right, depth - 1)


def _layout(seed: int) -> tuple[list[int], list[chunk_math.Box]]:
    """A random tiling (of odd layouts as much as grids), sometimes broken: a chunk
    moved, dropped, grown or repeated, or an empty chunk added."""
    rng = random.Random(seed)
    shape = [rng.randint(1, 9) for _ in range(rng.randint(1, 3))]
    boxes = _split(rng, [0] * len(shape), shape, 6)
    change = rng.choice(["none", "move", "drop", "grow", "repeat", "empty"])
    i = rng.randrange(len(boxes))
    offsets, sizes, _ = boxes[i]
    d = rng.randrange(len(shape))
    if change == "move" and offsets[d] > 0:
        boxes[i] = ([o - (k == d) for k, o in enumerate(offsets)], sizes, boxes[i][2])
    elif change == "drop" and len(boxes) > 1:
        del boxes[i]
    elif change == "grow" and offsets[d] + sizes[d] < shape[d]:
        grown = [n + (k == d) for k, n in enumerate(sizes)]
        boxes[i] = (offsets, grown, math.prod(grown))
    elif change == "repeat":
        boxes.append(boxes[i])
    elif change == "empty":
        boxes.append((offsets, [0] * len(shape), 0))
    rng.shuffle(boxes)
    return shape, boxes


@pytest.mark.parametrize("strategy", ["grid", "sweep"])
@pytest.mark.parametrize("seed", range(300))
def test_the_cover_rule_agrees_with_counting_every_element(
    seed: int, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of looking for overlaps (the grid, the sweep for layouts with many
    more grid cells than chunks) say what counting each element's chunks says."""
    monkeypatch.setattr(chunk_math, "_GRID_CELLS_PER_CHUNK", 1 << 30 if strategy == "grid" else 0)
    shape, boxes = _layout(seed)
    counts = torch.zeros(shape, dtype=torch.int32)
    for offsets, sizes, _ in boxes:
        counts[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] += 1
    fault = chunk_math.cover_fault(shape, boxes)
    assert (fault is None) == bool((counts == 1).all())
    if fault is not None and fault.overlapping is not None:
        first, second = fault.overlapping
        assert first is not second
        assert all(o1 < o2 + n2 and o2 < o1 + n1 for o1, n1, o2, n2 in zip(*first[:2], *second[:2]))


def test_an_overlap_in_a_layout_of_many_grid_cells_is_found() -> None:
    """Each row split at its own column: a grid of rows x columns cells for 2 x rows
    chunks, so the overlap (hidden by a gap) is found by the sweep."""
    rows = 32
    layout = [chunk([r, 0], [1, r + 1]) for r in range(rows)]
    layout += [chunk([r, r + 1], [1, rows - r]) for r in range(rows)]
    chunk_math.validate_cover("w", [rows, rows + 1], layout)
    layout[-1] = chunk([rows - 1, rows - 1], [1, 1])  # covers (31, 31) twice, leaves (31, 32)
    with pytest.raises(
        ValueError, match=r"saved chunk \(offsets \[31, 31\], sizes \[1, 1\]\) overlaps another"
    ):
        chunk_math.validate_cover("w", [rows, rows + 1], layout)


def test_overlap_and_contiguous_span() -> None:
    assert chunk_math.overlap(chunk([0, 0], [4, 4]), chunk([2, 2], [4, 4])) == (
        torch.Size([2, 2]),
        torch.Size([0, 0]),
        torch.Size([2, 2]),
    )
    assert chunk_math.overlap(chunk([0], [2]), chunk([2], [2])) is None
    # Rows of a row-major chunk are contiguous; a column slab is not.
    assert chunk_math.contiguous_span([4, 5], [1, 0], [2, 5]) == (5, 10)
    assert chunk_math.contiguous_span([4, 5], [2, 1], [1, 3]) == (11, 3)
    assert chunk_math.contiguous_span([4, 5], [0, 1], [2, 3]) is None
    assert chunk_math.contiguous_span([], [], []) == (0, 1)


def test_flatten_records_structure_and_rebuilds_it() -> None:
    state = {"a": {"b": [torch.ones(1), {"c": 2}], "e": {}}, "t": (torch.zeros(1), "x"), 3: {"k": 1}}
    flat = flatten_state_dict(state)
    assert list(flat.leaves) == ["a.b.0", "a.b.1.c", "t.0", "t.1", "3.k"]
    assert flat.paths["3.k"] == (3, "k")
    data = json.loads(json.dumps(flat.planner_data()))
    rebuilt = build_nested(flat.leaves, data)
    assert list(rebuilt) == ["a", "t", 3]
    assert rebuilt["a"]["e"] == {}
    assert isinstance(rebuilt["t"], tuple) and rebuilt["t"][1] == "x"
    assert rebuilt["a"]["b"][1] == {"c": 2}


def test_set_leaf_rebuilds_tuples_in_place() -> None:
    state = {"outer": [({"x": 1}, 5)]}
    inner_list = state["outer"]
    set_leaf(state, ("outer", 0, 1), 6)
    assert state["outer"] is inner_list
    assert state["outer"][0] == ({"x": 1}, 6)


def test_metadata_codec_round_trips_multi_chunk_entries() -> None:
    md = torchstow.planning.local_metadata({"w": torch.ones(4, 2, dtype=torch.bfloat16), "n": 1})
    md.state_dict_metadata["w"].chunks = [chunk([0, 0], [2, 2]), chunk([2, 0], [2, 2])]
    back = decode_metadata(encode_metadata(md))
    assert back.state_dict_metadata["w"].chunks == md.state_dict_metadata["w"].chunks
    assert back.state_dict_metadata["w"].properties.dtype == torch.bfloat16
    assert back.state_dict_metadata["n"].value == 1


def test_metadata_index_ignores_the_hint() -> None:
    a = MetadataIndex("w", [0, 2], index=5)
    b = MetadataIndex("w", torch.Size([0, 2]))
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    assert MetadataIndex("w") != MetadataIndex("w", [0])


def test_checkpoint_exception_keeps_failures_and_pickles() -> None:
    failures = {
        1: (torchstow.CheckpointNotFoundError("gone"), traceback.StackSummary()),
        3: (torchstow.CheckpointNotFoundError("gone too"), traceback.StackSummary()),
    }
    exc = CheckpointException.from_failures("reading metadata", failures)
    assert isinstance(exc, torchstow.CheckpointNotFoundError)
    assert isinstance(exc, FileNotFoundError)
    assert "rank 1: CheckpointNotFoundError: gone" in str(exc)
    assert "rank 3" in str(exc)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and set(back.failures) == {1, 3}
    mixed = CheckpointException.from_failures(
        "write", {0: (ValueError("a"), traceback.StackSummary()), 1: (OSError("b"), traceback.StackSummary())}
    )
    assert type(mixed) is CheckpointException


class RegionPlanner(DefaultLoadPlanner):
    """Loads one region of one stored tensor into ``target`` (like a rank's shard)."""

    def __init__(self, fqn: str, offsets: list[int], target: torch.Tensor) -> None:
        super().__init__(strict=False)
        self.fqn = fqn
        self.region = chunk(offsets, list(target.shape))
        self.target = target

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata[self.fqn].chunks
        dest = MetadataIndex(self.fqn, self.region.offsets)
        items = []
        for i, c in enumerate(stored):
            hit = chunk_math.overlap(self.region, c)
            if hit:
                items.append(
                    ReadItem(
                        LoadItemType.TENSOR,
                        dest,
                        hit[0],
                        MetadataIndex(self.fqn, c.offsets, i),
                        hit[1],
                        hit[2],
                    )
                )
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, start, length)
        return view

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise AssertionError("no objects here")


@pytest.fixture
def big(ckpt: str) -> torch.Tensor:
    value = torch.randn(4096, 1024)  # 16 MiB: four 4 MiB checksum blocks
    torchstow.save({"w": value}, ckpt)
    return value


@pytest.mark.parametrize(
    ("offsets", "shape"),
    [([100, 0], (200, 1024)), ([1000, 0], (2100, 1024)), ([0, 100], (4096, 200)), ([7, 3], (1, 5))],
    ids=["rows-in-one-block", "rows-across-blocks", "column-slab", "tiny"],
)
def test_partial_reads_match_the_region(
    ckpt: str, big: torch.Tensor, offsets: list[int], shape: tuple[int, int]
) -> None:
    target = torch.zeros(shape)
    torchstow.load({}, ckpt, planner=RegionPlanner("w", offsets, target))
    r, c = offsets
    assert torch.equal(target, big[r : r + shape[0], c : c + shape[1]])


def test_partial_read_verifies_only_the_blocks_it_touches(ckpt: str, big: torch.Tensor) -> None:
    doc = manifest_doc(ckpt)
    entry = doc["entries"]["w"]
    path = os.path.join(ckpt, doc["files"][entry["file"]])

    def flip(at: int) -> None:
        with open(path, "r+b") as f:
            f.seek(entry["offset"] + at)
            b = f.read(1)
            f.seek(entry["offset"] + at)
            f.write(bytes([b[0] ^ 0xFF]))

    rows = torch.zeros(200, 1024)  # bytes 409,600..1,228,800: inside block 0
    flip(15 << 20)  # corrupt block 3
    torchstow.load({}, ckpt, planner=RegionPlanner("w", [100, 0], rows))
    assert torch.equal(rows, big[100:300])
    flip(10)  # corrupt block 0 outside the region: the block check still catches it
    with pytest.raises(torchstow.ChecksumMismatchError, match="'w'"):
        torchstow.load({}, ckpt, planner=RegionPlanner("w", [100, 0], rows))
