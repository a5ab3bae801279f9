"""Streaming over a checkpoint's data files, checking every block checksum on the way.

:class:`StoredItems` holds every located item of a manifest as columns (file,
offset, length, checksum block, crc32c values): a version-2 manifest's chunk
table as it is, a version-1 manifest's locations turned into the same columns.
:func:`spans_by_file` groups its rows by data file in offset order, and
:func:`scan_file` reads one data file front to back in bounded segments,
checking every checksum block in the order the blocks lie in the file and
reporting every block that differs, a missing file or one that ends early. No
object is made per item unless it is reported. :func:`verify` reports what it
finds; :func:`copy` hands each segment to a sink of the destination too.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain

import torch

from torchstow.core.storage.store import ByteStore
from torchstow.errors import CorruptCheckpointError
from torchstow.format.checksums import block_bytes, checksum
from torchstow.format.located import _ranges
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata
from torchstow.format.table import TableLocations, crc_counts, one_thread

__all__ = [
    "FileSpans",
    "Problem",
    "StoredItems",
    "manifest_rows",
    "scan_file",
    "scan_rows",
    "segment_bytes",
    "spans_by_file",
]

_MIN_SEGMENT = 4 << 20
_MAX_SEGMENT = 64 << 20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: which key, in which file, at which byte offset.

    ``file`` and ``offset`` are None when the problem is in the manifest itself.
    """

    key: str
    file: str | None
    offset: int | None
    message: str

    def __str__(self) -> str:
        where = (
            ""
            if self.file is None
            else f" in {self.file}" + ("" if self.offset is None else f" at byte {self.offset}")
        )
        return f"{self.key!r}{where}: {self.message}"


Found = tuple[int | None, Problem]
"""A problem and the row of :class:`StoredItems` it is about (None: no row)."""


def _key_name(metadata: Metadata, index: MetadataIndex) -> str:
    entry = metadata.state_dict_metadata.get(index.fqn)
    if isinstance(entry, TensorStorageMetadata) and len(entry.chunks) > 1 and index.offset is not None:
        return f"{index.fqn}[chunk at {list(index.offset)}]"
    return index.fqn


def _int64(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64) if values else torch.zeros(0, dtype=torch.int64)


class StoredItems:
    """Every located item of a manifest, a row each, as int64 columns: ``file`` (into
    ``files``), ``offset``, ``length``, ``block`` (the bytes each checksum covers),
    ``crc_start`` and ``crc_count`` (the item's values in ``crcs``; a count of -1: its
    checksums do not cover it, so it is read but not checked). :meth:`key` names a
    row as reports name it; nothing else is made per row."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata
        with one_thread():  # passes over a few megabytes: more threads only cost hand-offs
            self._columns(metadata)

    def _columns(self, metadata: Metadata) -> None:
        data = metadata.storage_data
        if isinstance(data, TableLocations):  # version 2: the chunk table's own columns
            table = data.table
            self._table = table
            file = table.column("file")
            rows = torch.nonzero(file >= 0).flatten()
            self._rows = rows
            self._entry = table.column("entry")[rows]
            all_counts = crc_counts(table.column("length"), table.column("block"))
            self.files = list(table.files)
            self.file = file[rows]
            self.offset = table.column("offset")[rows]
            self.length = table.column("length")[rows]
            block = table.column("block")[rows]
            self.block = torch.where(block > 0, block, self.length.clamp(min=1))
            self.crc_start = (torch.cumsum(all_counts, 0) - all_counts)[rows]
            self.crc_count = all_counts[rows]
            self.crcs = table.column("crcs").to(torch.int64) & 0xFFFFFFFF
            self._indices: list[MetadataIndex] | None = None
            return
        # version 1 (or locations replaced by objects): the same columns, built from them
        pairs = list(data.items()) if isinstance(data, Mapping) else []
        infos: list[StorageInfo] = [info for _, info in pairs]
        self._indices = [index for index, _ in pairs]
        self.files = list(dict.fromkeys(info.relative_path for info in infos))
        ids = {name: i for i, name in enumerate(self.files)}
        self.file = _int64([ids[info.relative_path] for info in infos])
        self.offset = _int64([info.offset for info in infos])
        self.length = _int64([info.length for info in infos])
        self.block = _int64([block_bytes(info.block_size, info.length) for info in infos])
        counts = _int64([len(info.checksums) for info in infos])
        self.crc_start = torch.cumsum(counts, 0) - counts
        covered = counts == (self.length + self.block - 1) // self.block
        self.crc_count = torch.where(covered, counts, -1)
        self.crcs = _int64(list(chain.from_iterable(info.checksums for info in infos)))

    def __len__(self) -> int:
        return self.file.numel()

    def key(self, row: int) -> str:
        """The name reports give row ``row``'s item."""
        if self._indices is not None:
            return _key_name(self._metadata, self._indices[row])
        table_row = int(self._rows[row])
        return _key_name(self._metadata, self._table.index_of(int(self._entry[row]), table_row))

    def index(self, row: int) -> MetadataIndex:
        """Row ``row``'s key (of a manifest whose locations are objects)."""
        assert self._indices is not None
        return self._indices[row]

    def by_file(self) -> dict[str, FileSpans]:
        """The rows of each data file, in offset order (files in first use)."""
        with one_thread():
            return self._by_file()

    def _by_file(self) -> dict[str, FileSpans]:
        order = torch.argsort(self.offset, stable=True)
        order = order[torch.argsort(self.file[order], stable=True)]
        counts = torch.bincount(self.file[order], minlength=len(self.files)).tolist()
        groups = torch.split(order, counts)
        return {
            name: FileSpans(self, name, rows)
            for name, rows in zip(self.files, groups, strict=True)
            if len(rows)
        }


class FileSpans:
    """The items stored in one data file: rows of :class:`StoredItems`, in offset order;
    ``end`` is where the last one ends (the bytes of the file a scan reads), ``nbytes``
    the bytes they take."""

    def __init__(self, items: StoredItems, name: str, rows: torch.Tensor) -> None:
        self.items = items
        self.name = name
        self.rows = rows
        with one_thread():
            self.end = int((items.offset[rows] + items.length[rows]).max())
            self.nbytes = int(items.length[rows].sum())

    def __len__(self) -> int:
        return self.rows.numel()

    def blocks(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Every checksum block of the checked items: its first byte in the file, its
        end, its crc32c and its row, ordered by first byte."""
        with one_thread():
            return self._blocks()

    def _blocks(self) -> tuple[list[int], list[int], list[int], list[int]]:
        items = self.items
        rows = self.rows[items.crc_count[self.rows] > 0]
        count = items.crc_count[rows]
        at = _ranges(items.crc_start[rows], count)
        within = at - torch.repeat_interleave(items.crc_start[rows], count)
        size = torch.repeat_interleave(items.block[rows], count)
        start = torch.repeat_interleave(items.offset[rows], count) + within * size
        stop = torch.repeat_interleave(items.offset[rows] + items.length[rows], count)
        end = torch.minimum(start + size, stop)
        order = torch.argsort(start, stable=True)
        owner = torch.repeat_interleave(rows, count)
        return (
            start[order].tolist(),
            end[order].tolist(),
            items.crcs[at[order]].tolist(),
            owner[order].tolist(),
        )


def spans_by_file(metadata: Metadata) -> dict[str, FileSpans]:
    """The stored items of ``metadata``, grouped by data file, in offset order."""
    return StoredItems(metadata).by_file()


def manifest_rows(metadata: Metadata, items: StoredItems) -> list[Found]:
    """What the manifest itself gets wrong, each problem with the row of ``items`` it is
    about: stored chunks without a location, locations whose length does not match the
    chunk, checksums that do not cover the item."""
    data = metadata.storage_data
    if isinstance(data, TableLocations):
        return [(None, p) for p in _unlocated(data)]
    locations = data if isinstance(data, Mapping) else {}
    rows = {index: i for i, index in enumerate(locations)}
    found: list[Found] = []
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            if entry.encoding != "json" and MetadataIndex(fqn) not in locations:
                found.append((None, Problem(fqn, None, None, "the manifest records no data location")))
            continue
        for chunk in entry.chunks:
            index = MetadataIndex(fqn, chunk.offsets)
            info = locations.get(index)
            if info is None:
                if math.prod(chunk.sizes):
                    message = f"no data location for chunk {list(chunk.offsets)}"
                    found.append((None, Problem(fqn, None, None, message)))
                continue
            expected = math.prod(chunk.sizes) * entry.properties.dtype.itemsize
            if info.codec is None and info.length != expected:  # compressed: its own length
                message = f"the manifest records {info.length} bytes, but the chunk needs {expected}"
                found.append((rows[index], Problem(fqn, info.relative_path, info.offset, message)))
    for row in torch.nonzero(items.crc_count < 0).flatten().tolist():
        index = items.index(row)
        info = locations[index]
        message = f"the manifest records {len(info.checksums)} checksums for {info.length} bytes"
        found.append((row, Problem(_key_name(metadata, index), info.relative_path, info.offset, message)))
    return found


def _unlocated(data: TableLocations) -> list[Problem]:
    """The chunks and objects of a chunk table without a location that need one (its
    decoding checked every other rule :func:`manifest_rows` checks)."""
    table = data.table
    starts = table.starts
    found: dict[int, list[Problem]] = {}
    file, entries = table.column("file"), table.column("entry")
    for row in torch.nonzero(file < 0).flatten().tolist():  # tensor chunks only: objects' rows have files
        entry = int(entries[row])
        nd = table.ndim[entry]
        sizes = table.layout(entry)[1][(row - starts[entry]) * nd : (row - starts[entry] + 1) * nd]
        if math.prod(sizes):
            offsets = list(table.offsets(entry, row))
            found.setdefault(entry, []).append(
                Problem(table.entries[entry].fqn, None, None, f"no data location for chunk {offsets}")
            )
    for entry, shape in enumerate(table.entries):
        if shape.shape is None and shape.rows_allowed == 1 and starts[entry + 1] == starts[entry]:
            found[entry] = [Problem(shape.fqn, None, None, "the manifest records no data location")]
    return [p for entry in sorted(found) for p in found[entry]]


def segment_bytes(store: ByteStore) -> int:
    """How much one read of a streaming scan covers on ``store``."""
    return max(_MIN_SEGMENT, min(_MAX_SEGMENT, store.read_segment_bytes))


def _ends_early(store: ByteStore, name: str, end: int, exc: CorruptCheckpointError) -> str:
    """What a data file that ends before ``end`` lacks, by its size at the store (the
    read's own error where the store cannot tell sizes)."""
    size = (store.file_sizes() or {}).get(name)
    if size is None or size >= end:
        return f"the data file ends early: {exc}"
    return (
        f"the data file ends early: it holds {size:,} bytes, the manifest needs {end:,} "
        f"({end - size:,} bytes missing)"
    )


def scan_file(
    store: ByteStore,
    name: str,
    spans: FileSpans | None,
    *,
    write: Callable[[memoryview], None] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    write_keeps: bool = True,
) -> list[Problem]:
    """Read ``name`` from its start to the end of its last item, checking every block.

    Each segment read is passed to ``write`` (when given) before the next is
    read, so a copy holds one segment at a time: a fresh one for each, unless
    ``write_keeps`` is False (``write`` is done with a segment when it
    returns), when one buffer serves them all. ``progress`` is called with
    the number of bytes of each segment. Stops early (returning what it
    found so far) when ``stop`` is set. ``spans`` None or empty (a file of no item): nothing read.
    """
    if spans is None or not len(spans):
        return []
    return [
        p
        for _, p in scan_rows(
            store, name, spans, write=write, progress=progress, stop=stop, write_keeps=write_keeps
        )
    ]


def scan_rows(
    store: ByteStore,
    name: str,
    spans: FileSpans,
    *,
    write: Callable[[memoryview], None] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    write_keeps: bool = True,
) -> list[Found]:
    """:func:`scan_file`'s problems, each with the row of ``spans.items`` it is about.

    The checksum blocks are checked in the order they lie in the file: those inside a
    segment at once, one that crosses into the next segment carried on there."""
    items = spans.items
    end = spans.end
    starts, ends, expected, owner = spans.blocks()
    found: list[Found] = []

    def mismatch(block: int) -> Found:
        row, first, last = owner[block], starts[block], ends[block]
        message = f"checksum mismatch in bytes {first}..{last}: they differ from what was saved"
        return row, Problem(items.key(row), name, first, message)

    seg = segment_bytes(store)
    # Reading alone reuses one buffer, and so does a copy into a sink that keeps no buffer
    # (fresh memory costs page faults, a lot of them on some virtual machines).
    scratch = memoryview(bytearray(min(seg, end))) if write is None or not write_keeps else None
    carried: list[list[int]] = []  # [block, running crc] of blocks begun in an earlier segment
    after = 0  # the first block not yet begun
    pos = 0
    while pos < end:
        if stop is not None and stop.is_set():
            return found
        size = min(seg, end - pos)
        buf = scratch[:size] if scratch is not None else memoryview(bytearray(size))
        try:
            store.read_into(name, [(pos, buf)])
        except FileNotFoundError:
            return [
                (row, _at(items, row, name, None, "the data file is missing")) for row in spans.rows.tolist()
            ]
        except CorruptCheckpointError as exc:
            message = _ends_early(store, name, end, exc)
            rows = spans.rows[items.offset[spans.rows] + items.length[spans.rows] > pos].tolist()
            return found + [(row, _at(items, row, name, pos, message)) for row in rows]
        seg_end = pos + size
        still = []
        for begun in carried:
            block = begun[0]
            if ends[block] <= seg_end:
                if checksum(buf[: ends[block] - pos], begun[1]) != expected[block]:
                    found.append(mismatch(block))
            else:
                begun[1] = checksum(buf, begun[1])
                still.append(begun)
        stop_at = bisect_left(starts, seg_end, after)
        for block in range(after, stop_at):
            last = ends[block]
            if last <= seg_end:
                if checksum(buf[starts[block] - pos : last - pos]) != expected[block]:
                    found.append(mismatch(block))
            else:
                still.append([block, checksum(buf[starts[block] - pos :])])
        carried, after = still, stop_at
        if write is not None:
            write(buf)
        if progress is not None:
            progress(size)
        pos = seg_end
    return found


def _at(items: StoredItems, row: int, name: str, pos: int | None, message: str) -> Problem:
    """A problem of row ``row``'s item from byte ``pos`` of it on (its start: None)."""
    offset = int(items.offset[row])
    return Problem(items.key(row), name, offset if pos is None else max(pos, offset), message)
