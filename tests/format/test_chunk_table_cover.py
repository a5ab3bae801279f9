"""The chunk table's cover rule, decoded a column at a time: every layout of chunks is
accepted or refused exactly as :func:`cover_fault` (the one cover rule) decides, with the
same message, whatever order the rows come in and whether or not the layout is slabs."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

import torchstow.format.table
from torchstow.errors import CorruptCheckpointError
from torchstow.format.chunks import cover_fault
from torchstow.format.table import ChunkTable, EntryShape, TableColumns, crc_counts, encode_table

Layout = list[tuple[list[int], list[int]]]  # (offsets, sizes) per chunk


def _decode(entries: list[tuple[str, tuple[int, ...], Layout]]) -> ChunkTable:
    """A table of these tensors' chunks (float32, one file, raw), decoded."""
    entry, offs, sizes, length = [], [], [], []
    for i, (_, _, layout) in enumerate(entries):
        for o, s in layout:
            entry.append(i)
            offs += o
            sizes += s
            length.append(4 * math.prod(s))
    rows = len(entry)
    column = torch.tensor(length, dtype=torch.int64)
    block = torch.full((rows,), 4096, dtype=torch.int64)
    data = encode_table(
        TableColumns(
            torch.tensor(entry, dtype=torch.int64),
            torch.zeros(rows, dtype=torch.int64),
            torch.cumsum(column, 0) - column,
            column,
            block,
            torch.tensor(offs, dtype=torch.int64),
            torch.tensor(sizes, dtype=torch.int64),
            torch.zeros(int(crc_counts(column, block).sum()), dtype=torch.int32),
            torch.zeros(rows, dtype=torch.uint8),
            torch.zeros(rows, dtype=torch.uint8),
            b"",
        ),
        len(entries),
    )
    shapes = [EntryShape(fqn, shape, 4, -1) for fqn, shape, _ in entries]
    return ChunkTable.decode(data, files=["f"], codecs=[], entries=shapes, name="t")


def _tiling(rng: random.Random, offsets: list[int], shape: list[int], depth: int) -> Layout:
    """A random tiling of the box at ``offsets`` of ``shape``, cut along random dimensions."""
    cuttable = [d for d, n in enumerate(shape) if n > 1]
    if depth == 0 or not cuttable or rng.random() < 0.2:
        return [(offsets, shape)]
    d = rng.choice(cuttable)
    at = rng.randrange(1, shape[d])
    low, high = list(shape), list(shape)
    low[d], high[d] = at, shape[d] - at
    moved = list(offsets)
    moved[d] += at
    return _tiling(rng, offsets, low, depth - 1) + _tiling(rng, moved, high, depth - 1)


def _layout(rng: random.Random, shape: tuple[int, ...]) -> Layout:
    layout = _tiling(rng, [0] * len(shape), list(shape), 4)
    if rng.random() < 0.3:  # an empty chunk somewhere (it covers nothing: never an overlap)
        d = rng.randrange(len(shape))
        layout.insert(
            rng.randrange(len(layout) + 1),
            ([0] * len(shape), [0 if i == d else 1 for i in range(len(shape))]),
        )
    if rng.random() < 0.5:
        i = rng.randrange(len(layout))
        o, s = layout[i]
        d = rng.randrange(len(shape))
        o = list(o)
        o[d] = rng.randrange(shape[d] - s[d] + 1)  # moved inside the shape: an overlap and a gap, or nothing
        layout[i] = (o, s)
    if rng.random() < 0.5:
        rng.shuffle(layout)
    return layout


def _expected(shape: tuple[int, ...], layout: Layout) -> str | None:
    fault = cover_fault(shape, [(o, s, math.prod(s)) for o, s in layout])
    if fault is None:
        return None
    if fault.overlapping is None:
        return f"the chunks cover {fault.covered} elements of the {math.prod(shape)}"
    first, second = fault.overlapping
    return f"chunks at {first[0]} and {second[0]} overlap"


@pytest.mark.parametrize("seed", range(300))
def test_every_layout_is_judged_as_cover_fault_judges_it(seed: int) -> None:
    rng = random.Random(seed)
    shape = tuple(rng.randrange(1, 7) for _ in range(rng.randrange(1, 4)))
    layout = _layout(rng, shape)
    whole = ([0] * len(shape), list(shape))
    entries = [("before", shape, [whole]), ("w", shape, layout), ("after", shape, [whole])]
    expected = _expected(shape, layout)
    if expected is None:
        _decode(entries)
        return
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"entries['w']: {expected}")):
        _decode(entries)


def test_sharded_slabs_in_any_order_decode_and_a_shift_is_refused() -> None:
    rows = [([8 * r, 0], [8, 16]) for r in range(64)]
    _decode([("w", (512, 16), rows), ("v", (512, 16), rows[::-1])])
    shifted = [*rows[:10], ([8 * 10 + 1, 0], [8, 16]), *rows[11:]]  # right total, overlap and gap
    with pytest.raises(
        CorruptCheckpointError, match=re.escape("entries['w']: chunks at [81, 0] and [88, 0] overlap")
    ):
        _decode([("w", (512, 16), shifted)])


def test_the_first_row_outside_its_shape_is_named_across_dimension_counts() -> None:
    # Row 1 (a 2-D tensor's) and row 2 (a 1-D tensor's) both leave their shapes: row 1 is named.
    two = [([0, 0], [2, 3]), ([3, 0], [2, 3])]
    with pytest.raises(
        CorruptCheckpointError,
        match=r"row 1 \(entries\['a'\]\): the chunk \(offset 3, size 2 in dimension 0\)",
    ):
        _decode([("a", (4, 3), two), ("b", (3,), [([1], [3])])])


def test_chunks_cut_along_different_dimensions_are_compared_as_boxes() -> None:
    # In order along their own cut dimensions ([0, 1) rows, then [1, 2) columns), yet they
    # overlap at (0, 1) and leave (1, 0) uncovered: the right total.
    crossed = [([0, 0], [1, 2]), ([0, 1], [2, 1])]
    with pytest.raises(
        CorruptCheckpointError, match=re.escape("entries['w']: chunks at [0, 0] and [0, 1] overlap")
    ):
        _decode([("w", (2, 2), crossed)])
    _decode([("w", (2, 2), [([0, 0], [1, 2]), ([1, 0], [1, 1]), ([1, 1], [1, 1])])])


def test_slabs_and_grids_listed_row_by_row_are_proven_without_cover_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("cover_fault called: the layout was not proven a column at a time")

    monkeypatch.setattr(torchstow.format.table, "cover_fault", fail)
    rows = [([8 * r, 0], [8, 16]) for r in range(64)]
    columns = [([0, 4 * c], [512, 4]) for c in range(4)]
    grid = [([2 * r, 3 * c, 0], [2, 3, 5]) for r in range(3) for c in range(4)]
    with_empty = [([0], [0]), ([0], [3]), ([3], [0]), ([3], [4])]
    _decode(
        [("w", (512, 16), rows), ("c", (512, 16), columns), ("g", (6, 12, 5), grid), ("e", (7,), with_empty)]
    )
