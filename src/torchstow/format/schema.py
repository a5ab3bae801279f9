"""The manifest documents as :mod:`msgspec` structs: version 1 (one definition, read two
ways) and version 2 (:class:`DocumentV2`, its chunk table in a file of its own).

The structs are generic in the types of their integers, so the same
definition is read two ways:

- :data:`RangedDocument` holds every integer to its range while it is parsed,
  in C (offsets, sizes, byte offsets and lengths in 0..2**63-1, checksums in
  0..2**32-1, at most 64 dimensions): the fast path of the decoder
  (:mod:`torchstow.format.bulk`) relies on it.
- :data:`PlainDocument` takes any integer, so that a manifest the ranged types
  refuse is read again and :func:`~torchstow.format.validation.check_manifest`
  names the rule it breaks. The encoder writes these structs.

The JSON is the same either way (``docs/format.md`` documents it).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Generic, TypeVar

import msgspec

from torchstow.format.checksums import ALGORITHM
from torchstow.format.validation import MAX_DIMS

__all__ = [
    "Checksum",
    "Chunk",
    "ChunkTableRef",
    "Document",
    "DocumentV2",
    "Entry",
    "EntryV2",
    "Header",
    "Located",
    "PlainDocument",
    "PlainEntry",
    "RangedDocument",
]

MAX_INT = (1 << 63) - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Crc = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Dims = Annotated[tuple[Count, ...], msgspec.Meta(max_length=MAX_DIMS)]
MAX_TIMESTAMP = 253_402_128_000.0  # 9999-12-30 UTC: any local time of it is a datetime
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMESTAMP)]
"""``committed_at``: epoch seconds that ``datetime.fromtimestamp`` can show (a later or
negative one is refused, so one hostile manifest cannot break ``ls`` of its prefix)."""

N = TypeVar("N")  # a count, offset, length or index: int, or Count
C = TypeVar("C")  # one checksum: int, or Crc
D = TypeVar("D")  # a shape, chunk offsets or sizes: tuple[int, ...], or Dims


class Located(msgspec.Struct, Generic[N, C], omit_defaults=True):
    """Where an item's bytes are: a ``file`` index into the manifest's ``files``,
    the byte ``offset`` and ``length`` there, one checksum per ``block`` bytes, and
    the ``codec`` of compressed bytes."""

    file: N | None = None
    offset: N | None = None
    length: N | None = None
    crc32c: tuple[C, ...] | None = None
    block: N | None = None
    blake3: str | None = None
    codec: str | None = None  # optional: how the stored bytes are compressed (None: raw)


class Chunk(Located[N, C], Generic[N, C, D], kw_only=True, gc=False):
    """One chunk of a tensor: its ``offsets`` and ``sizes``, and its location
    (a chunk without one is valid, only slower to read)."""

    offsets: D
    sizes: D


class Entry(Located[N, C], Generic[N, C, D], kw_only=True):
    """A tensor entry (``dtype``, ``shape``, one location or ``chunks``) or an
    object entry (``encoding``, an inline ``value`` or one location)."""

    dtype: str | None = None
    shape: D | None = None
    requires_grad: bool = False
    chunks: list[Chunk[N, C, D]] | None = None
    encoding: str | None = None
    value: Any = None


class Checksum(msgspec.Struct, Generic[N]):
    algorithm: str = ALGORITHM
    block_size: N = 0  # type: ignore[assignment]


class Header(msgspec.Struct):
    """What every version has: the format's name and the version."""

    format: str = ""
    version: Any = None


class Document(msgspec.Struct, Generic[N, C, D], kw_only=True):
    format: str
    version: int
    torch_version: str = ""
    committed_at: Timestamp | None = None
    user_metadata: dict[str, Any] | None = None
    checksum: Checksum[N] = msgspec.field(default_factory=Checksum)
    files: list[str] = []
    planner_data: Any = None
    entries: dict[str, Entry[N, C, D]]
    storage_data: Any = msgspec.UNSET
    nbytes_written: int | None = None
    save_id: str | None = None  # optional within version 1: older manifests lack it, older readers ignore it
    save_seconds: float | None = None  # optional: how long the save took, as ls and info show it


PlainEntry = Entry[int, int, tuple[int, ...]]
PlainDocument = Document[int, int, tuple[int, ...]]
RangedDocument = Document[Count, Crc, Dims]


class EntryV2(msgspec.Struct, omit_defaults=True):
    """A version-2 entry: a tensor's ``dtype``, ``shape`` and ``requires_grad``, or an
    object's ``encoding`` and inline ``value``; every location is in the chunk table."""

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    requires_grad: bool = False
    encoding: str | None = None
    value: Any = None
    # What the entry rules ask of a location or chunk list in the JSON: there is none.
    file: ClassVar[None] = None
    chunks: ClassVar[None] = None


class ChecksumV2(msgspec.Struct):
    algorithm: str = ALGORITHM


class ChunkTableRef(msgspec.Struct):
    """The chunk table a version-2 manifest names: its file ``name``, ``length`` in
    bytes and BLAKE3 digest (64 hex digits)."""

    name: str
    length: int
    blake3: str


class DocumentV2(msgspec.Struct, kw_only=True):
    format: str
    version: int
    torch_version: str = ""
    committed_at: Timestamp | None = None
    user_metadata: dict[str, Any] | None = None
    checksum: ChecksumV2 = msgspec.field(default_factory=ChecksumV2)
    files: list[str] = []
    codecs: list[str] = []
    chunk_table: ChunkTableRef
    planner_data: Any = None
    entries: dict[str, EntryV2]
    storage_data: Any = msgspec.UNSET
    nbytes_written: int | None = None
    save_id: str | None = None
    save_seconds: float | None = None
