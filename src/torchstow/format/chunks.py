"""Chunk geometry: checking that stored chunks tile a tensor, and intersecting
the chunks a rank needs with the chunks a checkpoint holds."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch

from torchstow.format.manifest import ChunkStorageMetadata

__all__ = ["contiguous_span", "overlap", "validate_cover"]


def validate_cover(
    fqn: str,
    size: Sequence[int],
    chunks: Sequence[ChunkStorageMetadata],
    memo: dict[int, Any] | None = None,
) -> None:
    """Raise ValueError unless ``chunks`` tile a tensor of ``size`` exactly once.

    ``memo``, shared by the calls of one global planning while every chunk
    checked stays alive, remembers chunk objects that many tensors share.

    Works on the grid the chunk boundaries draw: each chunk must lie inside
    the tensor, and together they must cover every grid cell exactly once.
    For the chunks that sharding produces the grid has one cell per chunk,
    so the check is linear in the number of chunks, never pairwise.
    """
    ndim = len(size)
    if len(chunks) == 1 and chunks[0].sizes == size and not any(chunks[0].offsets):
        return
    if _tiles_along_one_dim(size, chunks, {} if memo is None else memo):
        return
    for chunk in chunks:
        if len(chunk.offsets) != ndim or len(chunk.sizes) != ndim:
            raise ValueError(f"{fqn}: chunk {_fmt(chunk)} does not have {ndim} dimensions")
        for off, length, dim in zip(chunk.offsets, chunk.sizes, size, strict=True):
            if off < 0 or length < 0 or off + length > dim:
                raise ValueError(f"{fqn}: chunk {_fmt(chunk)} lies outside the shape {list(size)}")
    if math.prod(size) == 0:
        return
    bounds = []
    for d in range(ndim):
        edges = {0, size[d]}
        for chunk in chunks:
            edges.add(chunk.offsets[d])
            edges.add(chunk.offsets[d] + chunk.sizes[d])
        bounds.append(sorted(edges))
    total_cells = math.prod(len(b) - 1 for b in bounds)
    spans = []
    covered = 0
    for chunk in chunks:
        span = [
            (
                bisect.bisect_left(bounds[d], chunk.offsets[d]),
                bisect.bisect_left(bounds[d], chunk.offsets[d] + chunk.sizes[d]),
            )
            for d in range(ndim)
        ]
        spans.append((chunk, span))
        covered += math.prod(hi - lo for lo, hi in span)
    if covered != total_cells:
        what = "overlap" if covered > total_cells else "leave gaps in"
        raise ValueError(f"{fqn}: the saved chunks {what} the tensor of shape {list(size)}")
    seen: set[tuple[int, ...]] = set()
    for chunk, span in spans:
        for cell in _cells(span):
            if cell in seen:
                raise ValueError(f"{fqn}: saved chunk {_fmt(chunk)} overlaps another chunk")
            seen.add(cell)


def _tiles_along_one_dim(
    size: Sequence[int], chunks: Sequence[ChunkStorageMetadata], memo: dict[int, Any]
) -> bool:
    """Whether ``chunks`` are slabs along one dimension (whole in every other one)
    that follow each other without gap or overlap: what sharding one dimension
    makes. A fast, exact check for that common case; False sends the chunks to
    the general grid check."""
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


def _fmt(chunk: ChunkStorageMetadata) -> str:
    return f"(offsets {list(chunk.offsets)}, sizes {list(chunk.sizes)})"


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
