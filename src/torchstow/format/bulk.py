"""The fast path of the version-1 decoder: ranges held by the types, chunks checked in bulk.

A large manifest is mostly tensor chunks (a sharded model: ranks x tensors of
them), so what it costs per chunk decides how fast it loads. Here:

- :data:`~torchstow.format.schema.RangedDocument` is the version-1 document
  with every integer's range in its type (offsets, sizes, byte offsets and
  lengths in 0..2**63-1, checksums in 0..2**32-1, at most 64 dimensions):
  :mod:`msgspec` checks them while it parses, in C. It is the one schema's
  structs with ranged integers; a manifest they refuse is decoded again with
  plain integers, and :func:`~torchstow.format.validation.check_manifest`
  names the rule it breaks.
- :func:`chunked_entries_ok` checks a tensor's chunks a column at a time
  (lengths, files, checksum counts) against its chunk layout, and checks each
  distinct layout (shape, chunk offsets and sizes, dtype size) once, however
  many tensors share it. It only ever says "these keep every rule"; an entry it
  is not sure of (a chunk without a location, which is valid, only slower to
  read) is left to the entry-by-entry validator, which explains.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Any, NamedTuple

import torch

from torchstow.errors import CorruptCheckpointError
from torchstow.format.chunks import cover_fault, outside
from torchstow.format.manifest import ChunkStorageMetadata, dtype_from_name
from torchstow.format.schema import MAX_INT

__all__ = ["chunked_entries_ok"]

_OFFSETS = attrgetter("offsets")
_SIZES = attrgetter("sizes")
_FILE = attrgetter("file")
_OFFSET = attrgetter("offset")
_ROW = attrgetter("length", "block", "codec")
_CRC = attrgetter("crc32c")


class _Layout(NamedTuple):
    """What a tensor's chunk layout asks of the chunks' locations, and its chunk objects."""

    rows: list[tuple[int, None, None]]  # each chunk's (length, block, codec) in a valid raw location
    counts: list[int]  # each chunk's number of checksums
    chunks: list[ChunkStorageMetadata]  # shared by every tensor of this layout


def _layout(
    dtype: str, shape: tuple[int, ...], offsets: tuple[Any, ...], sizes: tuple[Any, ...], block: int
) -> _Layout | None:
    """The layout's needs, if its chunks tile ``shape`` exactly once; else None."""
    try:
        itemsize = dtype_from_name(dtype).itemsize
    except CorruptCheckpointError:
        return None
    if math.prod(shape) * itemsize > MAX_INT:
        return None
    boxes = []
    for offs, sizes_ in zip(offsets, sizes, strict=True):
        if outside(offs, sizes_, shape) is not None:
            return None
        boxes.append((offs, sizes_, math.prod(sizes_)))
    if cover_fault(shape, boxes) is not None:
        return None
    nbytes = [count * itemsize for _, _, count in boxes]
    if not block and any(nbytes):
        return None
    return _Layout(
        [(n, None, None) for n in nbytes],
        [-(-n // block) for n in nbytes] if block else [0] * len(nbytes),
        [ChunkStorageMetadata(torch.Size(o), torch.Size(n)) for o, n in zip(offsets, sizes, strict=True)],
    )


_UNSEEN = _Layout([], [], [])


def _tensor_chunks(
    raw: Any, nfiles: int, block_size: int, layouts: dict[tuple[Any, ...], _Layout | None]
) -> list[ChunkStorageMetadata] | None:
    """The chunk objects of a tensor entry whose chunks keep every rule; else None."""
    chunks = raw.chunks
    if not chunks or raw.dtype is None or raw.shape is None:
        return None
    key = (raw.dtype, raw.shape, tuple(map(_OFFSETS, chunks)), tuple(map(_SIZES, chunks)))
    layout = layouts.get(key, _UNSEEN)
    if layout is _UNSEEN:
        layout = layouts[key] = _layout(*key, block_size)
    if layout is None:
        return None
    if list(map(_ROW, chunks)) != layout.rows:
        return None  # also a chunk with a block size of its own, without a length, or compressed
    try:  # a chunk without a file or checksums: None has no order and no len()
        if max(map(_FILE, chunks)) >= nfiles or list(map(len, map(_CRC, chunks))) != layout.counts:
            return None
    except TypeError:
        return None
    if None in map(_OFFSET, chunks):
        return None  # a chunk without an offset
    return layout.chunks


def chunked_entries_ok(
    entries: dict[str, Any], nfiles: int, block_size: int
) -> dict[str, list[ChunkStorageMetadata]]:
    """The tensor entries stored in chunks that keep every rule of the format, each
    with its chunk objects (one list shared by every tensor of the same layout).

    ``entries`` are :data:`~torchstow.format.schema.RangedDocument` entries (ranges already held), and
    every accepted chunk has a complete location in ``block_size``. A key left
    out may still be valid: the validator checks it one chunk at a time.
    """
    layouts: dict[tuple[Any, ...], _Layout | None] = {}
    found = {}
    for key, raw in entries.items():
        chunks = _tensor_chunks(raw, nfiles, block_size, layouts)
        if chunks is not None:
            found[key] = chunks
    return found
