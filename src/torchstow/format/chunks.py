"""Chunk geometry: the rules that stored chunks lie inside their tensor and tile it
exactly once (one implementation, for the planners and for the readers), and
intersecting the chunks a rank needs with the chunks a checkpoint holds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from torchstow.errors import CorruptCheckpointError
from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

__all__ = [
    "Box",
    "CoverFault",
    "contiguous_span",
    "cover_fault",
    "outside",
    "overlap",
    "region",
    "stored_chunk_sizes",
    "validate_cover",
]

Box = tuple[Sequence[int], Sequence[int], int]
"""A chunk as :func:`cover_fault` takes it: its offsets, its sizes, its number of elements."""

#: A layout whose grid has more cells than this per chunk is swept instead (see cover_fault).
_GRID_CELLS_PER_CHUNK = 8


def outside(offsets: Sequence[int], sizes: Sequence[int], shape: Sequence[int]) -> int | None:
    """Where a chunk leaves a tensor of ``shape``: the first dimension with a negative
    offset or size or reaching past the end, -1 when it has not ``shape``'s number of
    dimensions, None when it lies inside. The one bounds rule of chunks."""
    ndim = len(shape)
    if len(offsets) != ndim or len(sizes) != ndim:
        return -1
    for dim, (off, length, full) in enumerate(zip(offsets, sizes, shape, strict=True)):
        if off < 0 or length < 0 or off + length > full:
            return dim
    return None


class CoverFault(NamedTuple):
    """Why chunks do not tile their tensor exactly once."""

    covered: int  # the elements the chunks hold together
    numel: int  # the tensor's elements
    overlapping: tuple[Box, Box] | None = None  # two chunks that overlap, where the counts agree


def cover_fault(shape: Sequence[int], boxes: Sequence[Box]) -> CoverFault | None:
    """Why chunks (each inside ``shape``: see :func:`outside`) do not cover every
    element of the tensor exactly once, or None when they do. The one cover rule.

    Equal counts and no two chunks overlapping mean an exact tiling. Chunks cut
    along several dimensions are looked at on the grid their boundaries draw,
    each cell visited at most once: for the chunks sharding makes the grid has
    about one cell per chunk, so this is linear, never pairwise. Other layouts
    are swept along the dimension where chunks start at the most places,
    comparing only chunks that share a band there: linear for slabs along one
    dimension, and bounded by the pairs of chunks where the grid would have
    many more cells than chunks.
    """
    numel = math.prod(shape)
    covered = sum(box[2] for box in boxes)
    if covered != numel:
        return CoverFault(covered, numel)
    solid = [box for box in boxes if box[2]]
    if len(solid) < 2:
        return None
    ndim = len(shape)
    starts = [{box[0][d] for box in solid} for d in range(ndim)]
    grid = None
    if sum(len(places) > 1 for places in starts) > 1:  # cut along several dimensions
        bounds = [sorted(starts[d].union([b[0][d] + b[1][d] for b in solid])) for d in range(ndim)]
        if math.prod(len(edges) - 1 for edges in bounds) <= _GRID_CELLS_PER_CHUNK * len(solid):
            grid = bounds
    if grid is not None:
        pair = _overlap_on_grid(grid, solid)
    else:
        pair = _overlap_by_sweep(max(range(ndim), key=lambda d: len(starts[d])), solid)
    return None if pair is None else CoverFault(covered, numel, pair)


def _overlap_on_grid(bounds: list[list[int]], solid: list[Box]) -> tuple[Box, Box] | None:
    """Two chunks that share a cell of the grid drawn by ``bounds``, if any."""
    places = [{edge: i for i, edge in enumerate(edges)} for edges in bounds]
    owner: dict[tuple[int, ...], Box] = {}
    for box in solid:
        span = [
            (place[off], place[off + length])
            for place, off, length in zip(places, box[0], box[1], strict=True)
        ]
        for cell in _cells(span):
            other = owner.setdefault(cell, box)
            if other is not box:
                return other, box
    return None


def _overlap_by_sweep(dim: int, solid: list[Box]) -> tuple[Box, Box] | None:
    """Two overlapping chunks, found by a sweep along ``dim``."""
    active: list[Box] = []
    for box in sorted(solid, key=lambda b: b[0][dim]):
        start = box[0][dim]
        active = [a for a in active if a[0][dim] + a[1][dim] > start]
        for other in active:
            if all(
                o1 < o2 + s2 and o2 < o1 + s1
                for o1, s1, o2, s2 in zip(box[0], box[1], other[0], other[1], strict=True)
            ):
                return other, box
        active.append(box)
    return None


def validate_cover(
    fqn: str,
    size: Sequence[int],
    chunks: Sequence[ChunkStorageMetadata],
    memo: dict[int, Any] | None = None,
) -> None:
    """Raise ValueError unless ``chunks`` tile a tensor of ``size`` exactly once:
    the planners' wording of :func:`outside` and :func:`cover_fault`.

    ``memo``, shared by the calls of one global planning while every chunk
    checked stays alive, remembers chunk objects that many tensors share.
    Slabs along one dimension (what sharding one dimension makes) are
    recognised first, once per chunk object.
    """
    if len(chunks) == 1 and chunks[0].sizes == size and not any(chunks[0].offsets):
        return
    if _tiles_along_one_dim(size, chunks, {} if memo is None else memo):
        return
    for chunk in chunks:
        dim = outside(chunk.offsets, chunk.sizes, size)
        if dim is not None:
            if dim < 0:
                raise ValueError(
                    f"{fqn}: chunk {_fmt(chunk.offsets, chunk.sizes)} does not have {len(size)} dimensions"
                )
            raise ValueError(
                f"{fqn}: chunk {_fmt(chunk.offsets, chunk.sizes)} lies outside the shape {list(size)}"
            )
    fault = cover_fault(size, [(c.offsets, c.sizes, math.prod(c.sizes)) for c in chunks])
    if fault is None:
        return
    if fault.overlapping is None:
        what = "overlap" if fault.covered > fault.numel else "leave gaps in"
        raise ValueError(f"{fqn}: the saved chunks {what} the tensor of shape {list(size)}")
    offsets, sizes, _ = fault.overlapping[1]
    raise ValueError(f"{fqn}: saved chunk {_fmt(offsets, sizes)} overlaps another chunk")


def _tiles_along_one_dim(
    size: Sequence[int], chunks: Sequence[ChunkStorageMetadata], memo: dict[int, Any]
) -> bool:
    """Whether ``chunks`` are slabs along one dimension (whole in every other one)
    that follow each other without gap or overlap: what sharding one dimension
    makes. A fast, exact check for that common case; False sends the chunks to
    the general checks."""
    ndim = len(size)
    first = chunks[0]
    if len(first.sizes) != ndim or len(first.offsets) != ndim:
        return False
    dims = [d for d in range(ndim) if first.sizes[d] != size[d]] or [0]
    if len(dims) != 1:
        return False
    dim = dims[0]
    size = tuple(size)
    spans = []
    for chunk in chunks:
        known = memo.get(id(chunk))
        if known is None or known[0] is not chunk or known[1] != size or known[2] != dim:
            known = memo[id(chunk)] = (chunk, size, dim, _slab(size, dim, chunk))
        if known[3] is None:
            return False
        spans.append(known[3])
    spans.sort()
    end = 0
    for start, length in spans:
        if start != end:
            return False
        end = start + length
    return end == size[dim]


def _slab(size: tuple[int, ...], dim: int, chunk: ChunkStorageMetadata) -> tuple[int, int] | None:
    """(offset, length) along ``dim`` of a chunk whole in every other dimension, else None."""
    sizes, offsets = tuple(chunk.sizes), tuple(chunk.offsets)
    if len(sizes) != len(size) or len(offsets) != len(size) or sizes[dim] < 0:
        return None
    if (
        sizes[:dim] != size[:dim]
        or sizes[dim + 1 :] != size[dim + 1 :]
        or any(offsets[:dim] + offsets[dim + 1 :])
    ):
        return None
    return offsets[dim], sizes[dim]


def _cells(span: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    cells: list[tuple[int, ...]] = [()]
    for lo, hi in span:
        cells = [(*c, i) for c in cells for i in range(lo, hi)]
    return cells


def _fmt(offsets: Sequence[int], sizes: Sequence[int]) -> str:
    return f"(offsets {list(offsets)}, sizes {list(sizes)})"


def overlap(
    dest: ChunkStorageMetadata, stored: ChunkStorageMetadata
) -> tuple[torch.Size, torch.Size, torch.Size] | None:
    """Where two chunks of one tensor intersect, or None if they do not.

    Returns ``(dest_offsets, storage_offsets, lengths)``: the intersection's
    offsets relative to each chunk and its size.
    """
    dest_offsets = []
    storage_offsets = []
    lengths = []
    for d_off, d_len, s_off, s_len in zip(
        dest.offsets, dest.sizes, stored.offsets, stored.sizes, strict=True
    ):
        lo = max(d_off, s_off)
        hi = min(d_off + d_len, s_off + s_len)
        if hi <= lo:
            return None
        dest_offsets.append(lo - d_off)
        storage_offsets.append(lo - s_off)
        lengths.append(hi - lo)
    return torch.Size(dest_offsets), torch.Size(storage_offsets), torch.Size(lengths)


def region(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The view of ``tensor`` that starts at ``offsets`` and spans ``lengths``."""
    for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


def contiguous_span(
    chunk_sizes: Sequence[int], offsets: Sequence[int], lengths: Sequence[int]
) -> tuple[int, int] | None:
    """Element range ``(start, count)`` of a region of a row-major chunk, if contiguous.

    The region is contiguous when every dimension after the last narrowed one
    is spanned fully and every dimension before it has length one.
    """
    ndim = len(chunk_sizes)
    narrowed = [d for d in range(ndim) if lengths[d] != chunk_sizes[d]]
    if narrowed and any(lengths[d] != 1 for d in range(narrowed[-1])):
        return None
    start = 0
    stride = 1
    for d in range(ndim - 1, -1, -1):
        start += offsets[d] * stride
        stride *= chunk_sizes[d]
    return start, math.prod(lengths)


def stored_chunk_sizes(entry: TensorStorageMetadata, index: MetadataIndex) -> torch.Size:
    """The sizes of the stored chunk of ``entry`` that ``index`` names (its position hint
    first, then a search by offsets)."""
    hint = index.index
    if hint is not None and hint < len(entry.chunks) and entry.chunks[hint].offsets == index.offset:
        return entry.chunks[hint].sizes
    for chunk in entry.chunks:
        if chunk.offsets == index.offset:
            return chunk.sizes
    raise CorruptCheckpointError(f"the manifest has no chunk for {index}")
