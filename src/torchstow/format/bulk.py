"""The fast path of the version-1 decoder: ranges held by the types, chunks checked in bulk.

A large manifest is mostly tensor chunks (a sharded model: ranks x tensors of
them), so what it costs per chunk decides how fast it loads. Here:

- :class:`RangedDocument` is the version-1 document with every integer's range
  in its type (offsets, sizes, byte offsets and lengths in 0..2**63-1, checksums
  in 0..2**32-1, at most 64 dimensions): :mod:`msgspec` checks them while it
  parses, in C. The JSON is the same as :mod:`torchstow.format.codec`'s
  structs read and write; a manifest these types refuse is decoded again with
  those, and :func:`~torchstow.format.validation.check_manifest` names the
  rule it breaks.
- :func:`chunked_entries_ok` checks a tensor's chunks a column at a time
  (lengths, files, checksum counts) against its chunk layout, and checks each
  distinct layout (shape, chunk offsets and sizes, dtype size) once, however
  many tensors share it. It only ever says "these keep every rule"; an entry it
  is not sure of is left to the entry-by-entry validator, which explains.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Annotated, Any

import msgspec

from torchstow.errors import CorruptCheckpointError
from torchstow.format.checksums import DEFAULT_ALGORITHM
from torchstow.format.manifest import dtype_from_name
from torchstow.format.validation import MAX_DIMS, RuleError, check_tiling

__all__ = ["RangedDocument", "chunked_entries_ok"]

_MAX_INT = (1 << 63) - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT)]
Crc = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Dims = Annotated[tuple[Count, ...], msgspec.Meta(max_length=MAX_DIMS)]


class _Located(msgspec.Struct, gc=False):
    file: Count | None = None
    offset: Count | None = None
    length: Count | None = None
    crc32c: tuple[Crc, ...] | None = None
    block: Count | None = None
    blake3: str | None = None


class _Chunk(_Located, kw_only=True, gc=False):
    offsets: Dims
    sizes: Dims


class _Entry(_Located, kw_only=True):
    dtype: str | None = None
    shape: Dims | None = None
    requires_grad: bool = False
    chunks: list[_Chunk] | None = None
    encoding: str | None = None
    value: Any = None


class _Checksum(msgspec.Struct):
    algorithm: str = DEFAULT_ALGORITHM
    block_size: Count = 0


class RangedDocument(msgspec.Struct, kw_only=True):
    """A version-1 manifest, every integer held to its range while it is parsed."""

    format: str
    version: int
    torch_version: str = ""
    committed_at: float | None = None
    user_metadata: dict[str, Any] | None = None
    checksum: _Checksum = msgspec.field(default_factory=_Checksum)
    files: list[str] = []
    planner_data: Any = None
    entries: dict[str, _Entry]
    storage_data: Any = msgspec.UNSET
    nbytes_written: int | None = None
    save_id: str | None = None


_OFFSETS = attrgetter("offsets")
_SIZES = attrgetter("sizes")
_FILE = attrgetter("file")
_OFFSET = attrgetter("offset")
_LENGTH = attrgetter("length")
_CRC = attrgetter("crc32c")
_BLOCK = attrgetter("block")

# (dtype, shape, every chunk's offsets, every chunk's sizes, block size) ->
# (each chunk's bytes, each chunk's checksum count), or None: the layout breaks a rule.
_Layouts = dict[tuple[Any, ...], tuple[list[int], list[int]] | None]


def _layout(
    dtype: str, shape: tuple[int, ...], offsets: tuple[Any, ...], sizes: tuple[Any, ...], block: int
) -> tuple[list[int], list[int]] | None:
    """Each chunk's bytes and checksum count, if the chunks tile ``shape`` exactly once."""
    try:
        itemsize = dtype_from_name(dtype).itemsize
    except CorruptCheckpointError:
        return None
    ndim = len(shape)
    if math.prod(shape) * itemsize > _MAX_INT:
        return None
    boxes = []
    for offs, sizes_ in zip(offsets, sizes, strict=True):
        if len(offs) != ndim or len(sizes_) != ndim:
            return None
        if any(o + n > full for o, n, full in zip(offs, sizes_, shape, strict=True)):
            return None
        boxes.append((offs, sizes_, math.prod(sizes_)))
    try:
        check_tiling(shape, math.prod(shape), boxes)
    except RuleError:
        return None
    nbytes = [count * itemsize for _, _, count in boxes]
    if block:
        return nbytes, [-(-n // block) for n in nbytes]
    return (nbytes, [0] * len(nbytes)) if not any(nbytes) else None


def _tensor_ok(raw: Any, nfiles: int, block_size: int, layouts: _Layouts) -> bool:
    chunks = raw.chunks
    if not chunks:
        return False
    offsets = tuple(map(_OFFSETS, chunks))
    sizes = tuple(map(_SIZES, chunks))
    key = (raw.dtype, raw.shape, offsets, sizes, block_size)
    if key in layouts:
        need = layouts[key]
    else:
        need = layouts[key] = _layout(raw.dtype, raw.shape, offsets, sizes, block_size)
    if need is None:
        return False
    files = list(map(_FILE, chunks))
    if None in files or max(files) >= nfiles:
        return False  # also a chunk without a location (valid; the validator allows it)
    crcs = list(map(_CRC, chunks))
    if None in crcs or None in map(_OFFSET, chunks) or set(map(_BLOCK, chunks)) != {None}:
        return False  # a chunk with a block size of its own: checked one by one
    nbytes, counts = need
    return list(map(_LENGTH, chunks)) == nbytes and list(map(len, crcs)) == counts


def chunked_entries_ok(entries: dict[str, Any], nfiles: int, block_size: int) -> set[str]:
    """The keys of tensor entries stored in chunks that keep every rule of the format.

    ``entries`` are :class:`RangedDocument` entries (ranges already held). A key
    left out may still be valid: the validator checks it one chunk at a time.
    """
    layouts: _Layouts = {}
    return {
        key
        for key, raw in entries.items()
        if raw.chunks is not None
        and raw.dtype is not None
        and raw.shape is not None
        and _tensor_ok(raw, nfiles, block_size, layouts)
    }
