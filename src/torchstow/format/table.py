"""The chunk table of a version-2 manifest: one row per stored chunk, kept as columns.

A version-2 manifest (``docs/format.md``) keeps what people read in its JSON
and moves the per-chunk table (the entry each row belongs to, the chunk's
offsets and sizes, its file, byte offset, length, checksum block size, crc32c
values, BLAKE3 digest and codec) into a binary little-endian columnar file
beside it, its chunk table. :func:`encode_table` writes one;
:meth:`ChunkTable.decode` reads and validates one (every rule a version-1
manifest keeps, checked a column at a time with torch, so no Python object
is made per chunk); :class:`TableLocations` and :class:`TableChunks` are the
read-only views the rest of torchstow sees as ``Metadata.storage_data`` and
``TensorStorageMetadata.chunks``: their objects are made when a key is asked
for, and cached per key.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import struct
import sys
import warnings
from array import array
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import Any, NamedTuple

import torch

from torchstow.errors import CorruptCheckpointError
from torchstow.format.buffers import tensor_bytes
from torchstow.format.chunks import cover_fault
from torchstow.format.compression import BYTEPLANES, MAX_EXPANSION, expands_past
from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, StorageInfo, new_storage_info

__all__ = [
    "HEADER",
    "MAGIC",
    "TABLE_VERSION",
    "ChunkTable",
    "EntryShape",
    "TableChunks",
    "TableColumns",
    "TableLocations",
    "crc_counts",
    "encode_table",
]

MAGIC = b"TSCHUNKS"
TABLE_VERSION = 1
HEADER = struct.Struct("<8sII6Q")
"""magic, table version, flags (0), rows, dims, crcs, digests, entries, reserved (0): 64 bytes."""
DIGEST = 32  # bytes of one BLAKE3 digest
_MAX = (1 << 63) - 1


class EntryShape(NamedTuple):
    """What the table's checks need of one manifest entry (in the JSON's order)."""

    fqn: str
    shape: tuple[int, ...] | None  # None: an object entry
    itemsize: int  # of a tensor's dtype (0 for an object)
    rows_allowed: int  # how many rows an object may have (0 for json, 1 else); -1: a tensor, any

    @classmethod
    def of_object(cls, fqn: str, encoding: str | None) -> EntryShape:
        """An object entry: inline JSON has no row, any other encoding one (its location)."""
        return cls(fqn, None, 0, 0 if encoding == "json" else 1)

    @classmethod
    def of_tensor(cls, fqn: str, shape: Sequence[int], itemsize: int) -> EntryShape:
        """A tensor entry: any number of rows (its chunks)."""
        return cls(fqn, tuple(shape), itemsize, -1)


class TableColumns(NamedTuple):
    """The columns :func:`encode_table` writes: int64 ``entry``, ``file`` (-1: no
    location), ``offset``, ``length``, ``block``; the rows' chunk ``offsets`` and
    ``sizes`` (one per dimension of the row's entry, flat); uint32 ``crcs`` (flat);
    uint8 ``codec`` (0: none, i: the manifest's ``codecs[i - 1]``) and ``has_digest``;
    ``digests`` (32 bytes for each row with one). Arrays, bytes or torch tensors."""

    entry: Any
    file: Any
    offset: Any
    length: Any
    block: Any
    offsets: Any
    sizes: Any
    crcs: Any
    codec: Any
    has_digest: Any
    digests: Any


class _Place(NamedTuple):
    offset: int
    n: int  # values
    itemsize: int


def _places(rows: int, dims: int, crcs: int, digests: int) -> tuple[dict[str, _Place], int]:
    """Where each column starts (8-byte aligned) for these counts, and the table's length."""
    places = {}
    at = HEADER.size
    for name, count, size in (
        ("entry", rows, 8),
        ("file", rows, 8),
        ("offset", rows, 8),
        ("length", rows, 8),
        ("block", rows, 8),
        ("offsets", dims, 8),
        ("sizes", dims, 8),
        ("crcs", crcs, 4),
        ("codec", rows, 1),
        ("has_digest", rows, 1),
        ("digests", digests, DIGEST),
    ):
        at += -at % 8
        places[name] = _Place(at, count, size)
        at += count * size
    return places, at + (-at % 8)


_TORCH = {8: torch.int64, 4: torch.int32, 1: torch.uint8}


def _count(column: Any) -> int:
    if isinstance(column, torch.Tensor):
        return column.numel()
    return len(memoryview(column).cast("B")) // (memoryview(column).itemsize or 1) if column else 0


def encode_table(columns: TableColumns, entries: int) -> bytes:
    """The chunk table's bytes (``docs/format.md`` gives them byte by byte), joined from
    its header and columns in one copy."""
    rows = _count(columns.entry)
    dims = _count(columns.offsets)
    crcs = _count(columns.crcs)
    digests = _count(columns.digests) // DIGEST
    places, total = _places(rows, dims, crcs, digests)
    parts: list[Any] = [HEADER.pack(MAGIC, TABLE_VERSION, 0, rows, dims, crcs, digests, entries, 0)]
    held = []  # the tensors whose memory the parts view
    at = HEADER.size
    for name, place in places.items():
        nbytes = place.n * place.itemsize
        if not nbytes:
            continue
        parts.append(bytes(place.offset - at))  # alignment
        column = getattr(columns, name)
        if isinstance(column, torch.Tensor):
            dtype = torch.uint8 if name == "digests" else _TORCH[place.itemsize]
            column = column.reshape(-1).to(dtype).contiguous()
            held.append(column)
            view = tensor_bytes(column)
        else:
            view = memoryview(column).cast("B")
        if len(view) != nbytes:
            raise ValueError(f"column {name} holds {len(view)} bytes, not {nbytes}")
        parts.append(view)
        at = place.offset + nbytes
    parts.append(bytes(total - at))
    return b"".join(parts)


def crc_counts(length: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """How many crc32c values rows of these (non-negative) lengths and checksum blocks
    have: one per block begun, none without a block."""
    return torch.where(block > 0, (length - 1) // block.clamp(min=1) + 1, 0)  # 0 bytes: 0


def _fail(where: str, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: {message}")


class ChunkTable:
    """A chunk table's columns over its bytes, validated by :meth:`decode` (or trusted,
    when rebuilt from a pickle of one that was). Tensors for the checks done a
    column at a time; memoryviews of the same bytes for reading one row."""

    def __init__(
        self, data: bytes, files: list[str], codecs: list[str], entries: Sequence[EntryShape], name: str
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover (torch has no big-endian builds)
            raise NotImplementedError("reading a chunk table needs a little-endian machine")
        self.data = data
        self.files = files
        self.codecs = codecs
        self.entries = list(entries)
        self.name = name
        where = f"chunk table {name}"
        if len(data) < HEADER.size:
            raise _fail(where, f"{len(data)} bytes, shorter than its {HEADER.size}-byte header")
        magic, version, flags, rows, dims, crcs, digests, nentries, reserved = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise _fail(where, f"does not start with {MAGIC!r}: not a chunk table")
        if version != TABLE_VERSION:
            raise _fail(where, f"has table version {version}; this torchstow reads {TABLE_VERSION}")
        if flags or reserved:
            raise _fail(where, "reserved header fields are not 0")
        if nentries != len(self.entries):
            raise _fail(where, f"is for {nentries} entries; the manifest has {len(self.entries)}")
        # Every count is checked against the bytes there are before anything is sized by it.
        if max(rows, dims, crcs, digests) > len(data):
            raise _fail(where, "its header counts more values than the table has bytes")
        places, total = _places(rows, dims, crcs, digests)
        if total != len(data):
            raise _fail(where, f"is {len(data)} bytes; its header's counts make {total}")
        self.rows = rows
        self.places = places
        raw = memoryview(data)
        self._mv = {
            name: raw[p.offset : p.offset + p.n * p.itemsize].cast("q" if p.itemsize == 8 else "I")
            if p.itemsize in (4, 8)
            else raw[p.offset : p.offset + p.n * p.itemsize]
            for name, p in places.items()
        }
        ndim = [0 if e.shape is None else len(e.shape) for e in self.entries]
        self.ndim = ndim
        self.fqns = {e.fqn: i for i, e in enumerate(self.entries)}
        self._starts: list[int] | None = None
        self._entry_dims: list[int] | None = None
        self._crc_start: array[int] | None = None
        self._digest_at: array[int] | None = None
        self._layouts: dict[tuple[int, bytes, bytes], list[ChunkStorageMetadata]] = {}
        self._by_offsets: dict[int, dict[tuple[int, ...], int]] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (ChunkTable, (self.data, self.files, self.codecs, self.entries, self.name))

    def column(self, name: str) -> torch.Tensor:
        """Column ``name`` as a (read-only by convention) tensor over the table's bytes."""
        place = self.places[name]
        dtype = torch.uint8 if name == "digests" else _TORCH[place.itemsize]
        count = place.n * place.itemsize // dtype.itemsize
        if not count:
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bytes are immutable: nothing writes through it
            return torch.frombuffer(self.data, dtype=dtype, count=count, offset=place.offset)

    # -- rows -----------------------------------------------------------------

    @property
    def starts(self) -> list[int]:
        """Each entry's first row, and the row count last (rows are in entry order)."""
        if self._starts is None:
            counts = torch.bincount(self.column("entry"), minlength=len(self.entries))
            self._starts = [0, *torch.cumsum(counts, 0).tolist()]
        return self._starts

    def _dim_start(self, entry: int) -> int:
        """Where the first row of ``entry`` has its offsets and sizes."""
        if self._entry_dims is None:
            counts = torch.tensor(self.starts, dtype=torch.int64).diff() * torch.tensor(
                self.ndim, dtype=torch.int64
            )
            self._entry_dims = [0, *torch.cumsum(counts, 0).tolist()]
        return self._entry_dims[entry]

    def _crc_counts(self) -> torch.Tensor:
        return crc_counts(self.column("length"), self.column("block"))

    def crc_span(self, row: int) -> tuple[int, int]:
        if self._crc_start is None:
            self._crc_start = _cumulative(self._crc_counts())
        return self._crc_start[row], self._crc_start[row + 1]

    def digest(self, row: int) -> str | None:
        if not self._mv["has_digest"][row]:
            return None
        if self._digest_at is None:
            self._digest_at = _cumulative(self.column("has_digest").to(torch.int64))
        at = self.places["digests"].offset + DIGEST * self._digest_at[row]
        return self.data[at : at + DIGEST].hex()

    def info(self, row: int) -> StorageInfo | None:
        """Row ``row``'s location (None for a row without one)."""
        mv = self._mv
        file = mv["file"][row]
        if file < 0:
            return None
        lo, hi = self.crc_span(row)
        codec = mv["codec"][row]
        return new_storage_info(
            self.files[file],
            mv["offset"][row],
            mv["length"][row],
            tuple(mv["crcs"][lo:hi]),
            mv["block"][row],
            self.digest(row),
            self.codecs[codec - 1] if codec else None,
        )

    def offsets(self, entry: int, row: int) -> tuple[int, ...]:
        nd = self.ndim[entry]
        at = self._dim_start(entry) + (row - self.starts[entry]) * nd
        return tuple(self._mv["offsets"][at : at + nd])

    def chunks(self, entry: int) -> list[ChunkStorageMetadata]:
        """Entry ``entry``'s chunks, made once per layout (tensors chunked alike share them)."""
        lo, hi = self.starts[entry], self.starts[entry + 1]
        nd = self.ndim[entry]
        start = self._dim_start(entry)
        end = start + (hi - lo) * nd
        offs, sizes = self._mv["offsets"], self._mv["sizes"]
        key = (nd, offs[start:end].tobytes(), sizes[start:end].tobytes())
        made = self._layouts.get(key)
        if made is None and not nd:  # scalars: one empty chunk per row
            made = self._layouts[key] = [ChunkStorageMetadata(torch.Size(()), torch.Size(()))] * (hi - lo)
        if made is None:
            o, s = offs[start:end].tolist(), sizes[start:end].tolist()
            made = self._layouts[key] = [
                ChunkStorageMetadata(torch.Size(o[i : i + nd]), torch.Size(s[i : i + nd]))
                for i in range(0, end - start, nd)
            ]
        return made

    def layout(self, entry: int) -> tuple[memoryview, memoryview]:
        """Entry ``entry``'s chunk offsets and sizes, flat (views of the table's bytes)."""
        start = self._dim_start(entry)
        end = start + (self.starts[entry + 1] - self.starts[entry]) * self.ndim[entry]
        return self._mv["offsets"][start:end], self._mv["sizes"][start:end]

    def row_of(self, index: MetadataIndex) -> int | None:
        """The row ``index`` names (its position hint first), or None."""
        entry = self.fqns.get(index.fqn)
        if entry is None:
            return None
        lo, hi = self.starts[entry], self.starts[entry + 1]
        if index.offset is None:
            return lo if self.ndim[entry] == 0 and self.entries[entry].shape is None and hi > lo else None
        if len(index.offset) != self.ndim[entry] or self.entries[entry].shape is None:
            return None
        hint = index.index
        if hint is not None and 0 <= hint < hi - lo and self.offsets(entry, lo + hint) == tuple(index.offset):
            return lo + hint
        found = self._by_offsets.get(entry)
        if found is None:
            found = self._by_offsets[entry] = {}
            for row in range(hi - 1, lo - 1, -1):  # the first row wins, as in a version-1 manifest
                found[self.offsets(entry, row)] = row
        return found.get(tuple(index.offset))

    def index_of(self, entry: int, row: int) -> MetadataIndex:
        fqn = self.entries[entry].fqn
        if self.entries[entry].shape is None:
            return MetadataIndex(fqn)
        return MetadataIndex.of_chunk(fqn, torch.Size(self.offsets(entry, row)), row - self.starts[entry])

    def pair(self, row: int) -> tuple[MetadataIndex, StorageInfo]:
        """Row ``row``'s key and location (a row that has one)."""
        info = self.info(row)
        assert info is not None
        return self.index_of(self._mv["entry"][row], row), info

    def located(self) -> Iterator[tuple[int, int]]:
        """(entry, row) of every row with a location, in order."""
        file = self._mv["file"]
        starts = self.starts
        for entry in range(len(self.entries)):
            for row in range(starts[entry], starts[entry + 1]):
                if file[row] >= 0:
                    yield entry, row

    # -- checks ---------------------------------------------------------------

    @classmethod
    def decode(
        cls,
        data: bytes,
        *,
        files: list[str],
        codecs: list[str],
        entries: Sequence[EntryShape],
        name: str,
    ) -> ChunkTable:
        """Read a chunk table and check every rule of ``docs/format.md`` on it, a column at a
        time. Raises :class:`CorruptCheckpointError` naming the table, the row and its entry."""
        table = cls(data, files, codecs, entries, name)
        with one_thread():
            table._check()
        return table

    def _row_error(self, row: int, message: str) -> CorruptCheckpointError:
        entry = self._mv["entry"][row]
        key = f" (entries[{self.entries[entry].fqn!r}])" if 0 <= entry < len(self.entries) else ""
        return _fail(f"chunk table {self.name}", f"row {row}{key}: {message}")

    def _check(self) -> None:
        where = f"chunk table {self.name}"
        rows = self.rows
        nentries = len(self.entries)
        entry = self.column("entry")
        if rows:
            bad = (entry < 0) | (entry >= nentries)
            if bad.any():
                row = _first(bad)
                raise _fail(where, f"row {row}: entry {int(entry[row])} is not an index into the entries")
            back = entry[1:] < entry[:-1]
            if back.any():
                raise self._row_error(_first(back) + 1, "rows are not in the order of their entries")
        ndim = torch.tensor(self.ndim, dtype=torch.int64)
        row_ndim = ndim[entry]
        dims = int(row_ndim.sum())
        if dims != self.places["offsets"].n:
            raise _fail(where, f"holds {self.places['offsets'].n} chunk dimensions; its rows need {dims}")
        file, offset, length, block = (self.column(n) for n in ("file", "offset", "length", "block"))
        codec, has_digest = self.column("codec"), self.column("has_digest")
        self._check_rows(file, offset, length, block, codec, has_digest)
        counts = torch.bincount(entry, minlength=nentries)
        for shape_entry, n in zip(self.entries, counts.tolist(), strict=True):
            if shape_entry.rows_allowed >= 0 and n > shape_entry.rows_allowed:
                what = "an inline (json) object" if shape_entry.rows_allowed == 0 else "an object"
                raise _fail(where, f"entries[{shape_entry.fqn!r}] is {what}, but {n} rows belong to it")
        numel, groups = self._check_chunks(entry, row_ndim)
        self._check_lengths(entry, file, length, codec, numel)
        self._check_cover(entry, numel, groups)

    def _check_rows(
        self,
        file: torch.Tensor,
        offset: torch.Tensor,
        length: torch.Tensor,
        block: torch.Tensor,
        codec: torch.Tensor,
        has_digest: torch.Tensor,
    ) -> None:
        nfiles = len(self.files)
        if file.numel() == 0:
            return
        columns = {"file": file, "offset": offset, "length": length, "block": block}
        for name, bad, rule in (
            ("file", (file < -1) | (file >= nfiles), f"is not an index into 'files' ({nfiles} names) nor -1"),
            ("offset", offset < 0, "is negative"),
            ("length", length < 0, "is negative"),
            ("block", block < 0, "is negative"),
        ):
            if bad.any():
                row = _first(bad)
                raise self._row_error(row, f"{name} {int(columns[name][row])} {rule}")
        over = offset > _MAX - length
        if over.any():
            row = _first(over)
            raise self._row_error(
                row, f"offset {int(offset[row])} + length {int(length[row])} passes 2**63 - 1"
            )
        none = file == -1
        loose = none & ((offset != 0) | (length != 0) | (block != 0) | (codec != 0) | (has_digest != 0))
        if loose.any():
            raise self._row_error(_first(loose), "a row without a file (-1) must have no location")
        unblocked = (block == 0) & (length > 0)
        if unblocked.any():
            row = _first(unblocked)
            raise self._row_error(row, f"{int(length[row])} bytes with a checksum block size of 0")
        need = int(self._crc_counts().sum())
        if need != self.places["crcs"].n:
            raise _fail(
                f"chunk table {self.name}",
                f"holds {self.places['crcs'].n} crc32c values; its rows' lengths and blocks need {need}",
            )
        wrong = codec > len(self.codecs)
        if wrong.any():
            row = _first(wrong)
            raise self._row_error(row, f"codec {int(codec[row])}; 'codecs' names {len(self.codecs)}")
        flag = has_digest > 1
        if flag.any():
            raise self._row_error(_first(flag), f"digest flag {int(has_digest[_first(flag)])} is not 0 or 1")
        if int(has_digest.sum()) != self.places["digests"].n:
            raise _fail(
                f"chunk table {self.name}",
                f"holds {self.places['digests'].n} digests; its rows' flags need {int(has_digest.sum())}",
            )

    def _check_chunks(self, entry: torch.Tensor, row_ndim: torch.Tensor) -> tuple[torch.Tensor, list[_Rows]]:
        """Every chunk lies inside its tensor; returns each row's element count and the
        rows grouped by their number of dimensions (for :meth:`_check_cover`)."""
        rows = self.rows
        if not rows:
            return torch.zeros(0, dtype=torch.int64), []
        width = max(max(self.ndim, default=0), 1)
        shapes = torch.tensor(
            [(*(e.shape or ()), *(0,) * (width - len(e.shape or ()))) for e in self.entries],
            dtype=torch.int64,
        ).reshape(len(self.entries), width)
        offs, sizes = self.column("offsets"), self.column("sizes")
        numel = torch.ones(rows, dtype=torch.int64)
        groups = []
        first: tuple[int, int, int, int, int, int] | None = None  # flat position, row, dim, o, s, f
        firsts = None
        dims = set(self.ndim)
        for nd in sorted(dims):
            if nd == 0:
                continue
            if len(dims) == 1:  # every row has nd dimensions: the columns are [rows, nd]
                ids, at = None, None
                o, s, e = offs.reshape(rows, nd), sizes.reshape(rows, nd), entry
            else:
                ids = torch.nonzero(row_ndim == nd).flatten()
                if not ids.numel():
                    continue
                if firsts is None:
                    firsts = torch.cumsum(row_ndim, 0) - row_ndim
                at = firsts[ids].unsqueeze(1) + torch.arange(nd, dtype=torch.int64)
                o, s, e = offs[at], sizes[at], entry[ids]
            full = shapes[:, :nd].contiguous().index_select(0, e)  # contiguous: 3x faster
            bad = (o < 0) | (s < 0) | (s > full - o)  # offset past the shape: full - o < 0 <= s
            if bad.any():
                i, d = divmod(_first(bad), nd)
                flat = i * nd + d if at is None else int(at[i, d])
                if first is None or flat < first[0]:
                    row = i if ids is None else int(ids[i])
                    first = (flat, row, d, int(o[i, d]), int(s[i, d]), int(full[i, d]))
                continue
            count = s.prod(1)
            if ids is None:
                numel = count
            else:
                numel[ids] = count
            groups.append(_Rows(e, o, s, count))
        if first is not None:
            _, row, d, o_, s_, f = first
            raise self._row_error(
                row, f"the chunk (offset {o_}, size {s_} in dimension {d}) leaves the shape's {f} there"
            )
        return numel, groups

    def _check_lengths(
        self,
        entry: torch.Tensor,
        file: torch.Tensor,
        length: torch.Tensor,
        codec: torch.Tensor,
        numel: torch.Tensor,
    ) -> None:
        """A raw tensor chunk's length is its elements' bytes; a compressed one's can hold
        them (:data:`~torchstow.format.compression.MAX_EXPANSION`)."""
        if not self.rows:
            return
        itemsize = torch.tensor([e.itemsize for e in self.entries], dtype=torch.int64)[entry]
        tensor = torch.tensor([e.shape is not None for e in self.entries], dtype=torch.bool)[entry]
        nbytes = numel * itemsize
        bad = tensor & (file >= 0) & (codec == 0) & (length != nbytes)
        if bad.any():
            row = _first(bad)
            raise self._row_error(
                row, f"length is {int(length[row])} bytes, but its elements take {int(nbytes[row])}"
            )
        squeezed = tensor & (file >= 0) & (codec != 0) & expands_past(nbytes, length)
        if squeezed.any():
            row = _first(squeezed)
            raise self._row_error(
                row,
                f"length is {int(length[row])} bytes, which no compressed item expands to the "
                f"{int(nbytes[row])} its elements take (at most {MAX_EXPANSION}x)",
            )
        if BYTEPLANES in self.codecs:  # byte planes only for a tensor of several bytes per element
            planes = (codec == self.codecs.index(BYTEPLANES) + 1) & (file >= 0) & (~tensor | (itemsize < 2))
            if planes.any():
                raise self._row_error(
                    _first(planes), f"codec {BYTEPLANES!r} needs a tensor of several bytes per element"
                )

    def _check_cover(self, entry: torch.Tensor, numel: torch.Tensor, groups: list[_Rows]) -> None:
        """Each tensor's chunks cover every element once: counts add up (all at once), then
        no two overlap. Slabs along one dimension in order (what sharding makes) are proven
        disjoint a column at a time; any other layout is checked by :func:`cover_fault`
        (each distinct layout once)."""
        where = f"chunk table {self.name}"
        covered = torch.zeros(len(self.entries), dtype=torch.int64)
        if self.rows:
            covered.index_add_(0, entry, numel)
        covered_list = covered.tolist()
        counts = [b - a for a, b in itertools.pairwise(self.starts)]
        suspect = torch.zeros(len(self.entries), dtype=torch.bool)
        for group in groups if max(counts, default=0) > 1 else ():  # one chunk each: nothing overlaps
            suspect[_not_proven_disjoint(group)] = True
        look = set(torch.nonzero(suspect).flatten().tolist())
        seen: set[tuple[Any, ...]] = set()
        offs, sizes = self._mv["offsets"], self._mv["sizes"]
        for e, shape_entry in enumerate(self.entries):
            shape = shape_entry.shape
            if shape is None:
                continue
            n = counts[e]
            total = math.prod(shape)
            if n == 0 and not total:
                continue  # an empty tensor without chunks
            if covered_list[e] != total:
                raise _fail(
                    where,
                    f"entries[{shape_entry.fqn!r}]: the chunks cover {covered_list[e]} elements of the "
                    f"{total} in shape {list(shape)}",
                )
            if e not in look or n < 2 or not shape:
                continue
            nd = len(shape)
            lo = self._dim_start(e)
            hi = lo + n * nd
            key = (shape, offs[lo:hi].tobytes(), sizes[lo:hi].tobytes())
            if key in seen:
                continue
            o, s = offs[lo:hi].tolist(), sizes[lo:hi].tolist()
            boxes = [(o[i : i + nd], s[i : i + nd], math.prod(s[i : i + nd])) for i in range(0, hi - lo, nd)]
            fault = cover_fault(shape, boxes)
            if fault is not None:
                first, second = fault.overlapping or (boxes[0], boxes[0])
                raise _fail(
                    where, f"entries[{shape_entry.fqn!r}]: chunks at {first[0]} and {second[0]} overlap"
                )
            seen.add(key)

    # -- fast paths for the views -----------------------------------------------

    def total_length(self) -> int:
        """Bytes of data the located rows occupy."""
        if not self.rows:
            return 0
        return int(torch.where(self.column("file") >= 0, self.column("length"), 0).sum())

    def file_names(self) -> set[str]:
        """The files some row is stored in."""
        if not self.rows:
            return set()
        used = torch.unique(self.column("file")).tolist()
        return {self.files[i] for i in used if i >= 0}

    def beyond(self, sizes: Mapping[str, int]) -> tuple[set[str], list[int]]:
        """(files rows name that ``sizes`` lacks, rows reaching past the end of their file)."""
        if not self.rows:
            return set(), []
        known = torch.tensor([sizes.get(name, -1) for name in self.files] or [0], dtype=torch.int64)
        file = self.column("file")
        located = file >= 0
        size = known[file.clamp(min=0)]
        present = located & (size >= 0)
        end = self.column("offset") + self.column("length")
        past = torch.nonzero(present & (end > size)).flatten().tolist()
        missing_ids = torch.unique(file[located & (size < 0)]).tolist()
        return {self.files[i] for i in missing_ids}, past

    def renamed(self, names: Mapping[str, str]) -> ChunkTable:
        """This table with its files renamed (same bytes: rows name files by index)."""
        return ChunkTable(
            self.data, [names.get(n, n) for n in self.files], self.codecs, self.entries, self.name
        )


class _Rows(NamedTuple):
    """The rows of one number of dimensions: their entries, chunk offsets and sizes
    ([rows, dims]) and element counts."""

    entry: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    numel: torch.Tensor


def _not_proven_disjoint(rows: _Rows) -> torch.Tensor:
    """The entries among ``rows`` whose chunks this cannot prove pairwise disjoint: proven
    are chunks (those with elements) in lexicographic order, each differing from the one
    before first in a dimension where it begins at or after that one's end. Then any two
    are disjoint in some dimension: slabs along one dimension (what sharding makes) and
    grids listed row by row are proven so."""
    solid = rows.numel > 0
    entry, offsets, sizes = rows.entry, rows.offsets, rows.sizes
    if not bool(solid.all()):
        entry, offsets, sizes = entry[solid], offsets[solid], sizes[solid]
    same = (offsets[1:] == offsets[:-1]) & (sizes[1:] == sizes[:-1])
    dim = (~same).to(torch.uint8).argmax(1, keepdim=True)  # the first dimension they differ in
    start, end = offsets[1:], offsets[:-1] + sizes[:-1]
    if bool(dim.any()):
        start, end = start.gather(1, dim), end.gather(1, dim)
    else:  # all differ in dimension 0 (or not at all)
        start, end = start[:, :1], end[:, :1]
    bad = torch.zeros(entry.numel(), dtype=torch.bool)
    bad[1:] = (entry[1:] == entry[:-1]) & (start[:, 0] < end[:, 0])  # the same chunk twice: too
    return entry[bad]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's element-wise passes over the columns on one thread: a pass over a few
    megabytes gains nothing from more, and on a busy machine their hand-offs made the
    checks ten times slower (measured). torch's thread count is process-wide: restored after."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _first(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.flatten())[0, 0])


def _cumulative(counts: torch.Tensor) -> array[int]:
    """[0, c0, c0 + c1, ...] as an array (fast to index one element at a time)."""
    out = array("q", bytes(8 * (counts.numel() + 1)))
    if counts.numel():
        target = torch.frombuffer(out, dtype=torch.int64)
        torch.cumsum(counts.to(torch.int64), 0, out=target[1:])
    return out


class TableChunks(Sequence[ChunkStorageMetadata]):
    """One tensor's chunks, read from the chunk table when first asked for."""

    __slots__ = ("_entry", "_list", "_table")

    def __init__(self, table: ChunkTable, entry: int) -> None:
        self._table = table
        self._entry = entry
        self._list: list[ChunkStorageMetadata] | None = None

    def _chunks(self) -> list[ChunkStorageMetadata]:
        if self._list is None:
            self._list = self._table.chunks(self._entry)
        return self._list

    def flat_layout(self) -> tuple[memoryview, memoryview]:
        """The chunks' offsets and sizes, flat, without an object per chunk."""
        return self._table.layout(self._entry)

    def __len__(self) -> int:
        starts = self._table.starts
        return starts[self._entry + 1] - starts[self._entry]

    def __getitem__(self, i: Any) -> Any:
        return self._chunks()[i]

    def __iter__(self) -> Iterator[ChunkStorageMetadata]:
        return iter(self._chunks())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    def __hash__(self) -> int:  # a list is unhashable; so is this
        raise TypeError("unhashable type: 'TableChunks'")

    def __repr__(self) -> str:
        return repr(self._chunks())

    def __reduce__(self) -> tuple[Any, ...]:
        return (TableChunks, (self._table, self._entry))


class _Items(ItemsView[MetadataIndex, StorageInfo]):
    """The items of :class:`TableLocations`, made row by row (validation's extents check
    sees the table through ``table``)."""

    _mapping: TableLocations

    @property
    def table(self) -> ChunkTable:
        return self._mapping.table

    def __iter__(self) -> Iterator[tuple[MetadataIndex, StorageInfo]]:
        return self._mapping._pairs()


class _Values(ValuesView[StorageInfo]):
    _mapping: TableLocations

    def __iter__(self) -> Iterator[StorageInfo]:
        return (info for _, info in self._mapping._pairs())


class TableLocations(Mapping[MetadataIndex, StorageInfo]):
    """``Metadata.storage_data`` of a version-2 manifest: every located row as a
    :class:`StorageInfo`, keyed by its :class:`MetadataIndex`, made when asked for."""

    __slots__ = ("_cache", "table")

    def __init__(self, table: ChunkTable) -> None:
        self.table = table
        self._cache: dict[int, StorageInfo] = {}

    def _info(self, row: int) -> StorageInfo | None:
        info = self._cache.get(row)
        if info is None:
            info = self.table.info(row)
            if info is not None:
                self._cache[row] = info
        return info

    def __getitem__(self, index: MetadataIndex) -> StorageInfo:
        if not isinstance(index, MetadataIndex):
            raise KeyError(index)
        row = self.table.row_of(index)
        info = None if row is None else self._info(row)
        if info is None:
            raise KeyError(index)
        return info

    def __iter__(self) -> Iterator[MetadataIndex]:
        return (self.table.index_of(entry, row) for entry, row in self.table.located())

    def _pairs(self) -> Iterator[tuple[MetadataIndex, StorageInfo]]:
        for entry, row in self.table.located():
            info = self._info(row)
            assert info is not None
            yield self.table.index_of(entry, row), info

    def __len__(self) -> int:
        if not self.table.rows:
            return 0
        return int((self.table.column("file") >= 0).sum())

    def items(self) -> _Items:
        return _Items(self)

    def values(self) -> _Values:
        return _Values(self)

    def total_length(self) -> int:
        """Bytes of data the items occupy (from the columns)."""
        return self.table.total_length()

    def file_names(self) -> set[str]:
        """The data files the items are in (from the columns)."""
        return self.table.file_names()

    def renamed(self, names: Mapping[str, str]) -> TableLocations:
        """These locations with their files renamed."""
        return TableLocations(self.table.renamed(names))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return len(self) == len(other) and dict(self.items()) == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:  # a dict is unhashable; so is this
        raise TypeError("unhashable type: 'TableLocations'")

    def __repr__(self) -> str:
        return f"TableLocations({len(self)} items in {self.table.name})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (TableLocations, (self.table,))
