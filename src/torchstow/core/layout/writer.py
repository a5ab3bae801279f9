"""The layout every file-like backend shares: how items are packed into data
files, checksummed, and committed by writing the manifest last.

Each rank writes its items into up to ``thread_count`` data files, one
thread per file, named ``data-<save id>-<rank>-<n>.bin`` so a new save never
touches the files of the checkpoint it replaces. Items are aligned (64 bytes,
4 KiB for items of 1 MiB and more) so they can be read in place or mapped,
and carry one crc32c per 4 MiB block, so a partial (resharded) read can still
verify what it reads. The coordinator publishes ``manifest.json`` atomically
once every rank has written; only then does the checkpoint exist. Files of a
replaced checkpoint are removed after the new manifest is in place.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any

import torch

from torchstow.core.futures import completed_future
from torchstow.core.layout.commit import CommitOutcome, committed_files, listed_files, publish_manifest
from torchstow.core.layout.compression import compress
from torchstow.core.layout.digest_memo import DigestSlot
from torchstow.core.layout.incremental import BaseContent, BaseLoader
from torchstow.core.layout.location import StoreOpener, check_vacant, dcp_files, default_thread_count, rebind
from torchstow.core.layout.views import as_host_bytes, tensor_bytes
from torchstow.core.planning import DefaultSavePlanner, SavePlan, SavePlanner
from torchstow.core.storage.interfaces import StorageWriter, WriteResult, WrittenItems, location_columns
from torchstow.core.storage.store import Buffer, ByteStore, FileSink
from torchstow.errors import CorruptCheckpointError
from torchstow.format.checksums import checksum
from torchstow.format.codec import check_format_version
from torchstow.format.files import (
    BLOCK_SIZE,
    LARGE_ALIGN,
    LARGE_ITEM,
    alignment,
    chunk_table_name,
    data_file_name,
    data_file_prefix,
)
from torchstow.format.located import LocationColumns, attach_locations
from torchstow.format.manifest import FORMAT_VERSION, Metadata, StorageInfo, located_files
from torchstow.format.structure import check_utf8_keys
from torchstow.format.validation import check_extents

__all__ = ["LayoutWriter"]

logger = logging.getLogger(__name__)

_QUEUE_ITEMS = 1024
_SEGMENT = 1 << 20
_FLUSH_BYTES = 8 << 20
_ZEROS = bytes(LARGE_ALIGN)

_FQN = attrgetter("index.fqn")

#: Where a tensor item's digest may be remembered, given its data and its state-dict value.
DigestSlots = Callable[[torch.Tensor, Any], DigestSlot | None]


@dataclass(frozen=True)
class _FilePrefix:
    """The storage data the coordinator attaches to each rank's save plan."""

    prefix: str


def _split(items: Sequence[Any], sizes: Sequence[int], parts: int) -> list[list[Any]]:
    """Assign items to at most ``parts`` files (one writer thread each).

    Large items are spread over the files by bytes, biggest first; small
    items stay together in one file. Writing a small item is mostly Python
    work under the GIL, where a second thread only adds contention, while
    large items spend their time in checksums and system calls that release it.
    """
    if not items:
        return []
    large = [i for i in range(len(items)) if sizes[i] >= LARGE_ITEM]
    if parts <= 1 or not large:
        return [list(items)]
    bins: list[list[Any]] = [[] for _ in range(min(parts, len(large)))]
    loads = [0] * len(bins)
    for i in sorted(large, key=lambda i: -sizes[i]):
        target = loads.index(min(loads))
        bins[target].append(items[i])
        loads[target] += sizes[i]
    small = [items[i] for i in range(len(items)) if sizes[i] < LARGE_ITEM]
    bins[loads.index(min(loads))].extend(small)
    return bins


def set_format_version(writer: Any, version: int) -> None:
    """Make ``writer`` (or the :class:`LayoutWriter` it forwards to) commit manifests of
    format ``version`` (``save(..., format_version=)``); ValueError for a version this
    torchstow does not write, or another version than the default for a writer of another kind."""
    check_format_version(version)
    target = writer
    while not isinstance(target, LayoutWriter) and hasattr(target, "inner"):
        target = target.inner
    if isinstance(target, LayoutWriter):
        target.format_version = version
    elif version != FORMAT_VERSION:
        raise ValueError(
            f"format_version={version} needs a torchstow layout writer; {type(writer).__name__} "
            "writes its own manifest format"
        )


class LayoutWriter(StorageWriter):
    """A :class:`StorageWriter` over any :class:`ByteStore`.

    ``overwrite`` allows replacing a committed checkpoint (the old one stays
    loadable until the new manifest is published). ``thread_count`` is the
    number of files, and threads, per rank. ``format_version`` is the manifest
    format the commit writes (``save(..., format_version=1)`` sets it).
    """

    def __init__(
        self,
        store: ByteStore,
        *,
        overwrite: bool = False,
        thread_count: int | None = None,
        open_store: StoreOpener | None = None,
    ) -> None:
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, got {thread_count}")
        self.store = store
        self.overwrite = overwrite
        self.format_version = FORMAT_VERSION
        self.thread_count = thread_count or default_thread_count()
        self._written: list[str] = []
        self._open_store = open_store
        self._rank = 0
        self.base_loader: BaseLoader | None = None
        #: With a base: where a tensor item's digest may be remembered (trust_version_counter).
        self.digest_slots: DigestSlots | None = None
        #: How each item is compressed (``save(..., compression=)``; None: raw bytes).
        self.compression: str | None = None
        self._base: BaseContent | None = None
        #: Whether ``finish`` ran here, and then what its commit did (landed, certainly
        #: not, unknown: :class:`CommitOutcome`).
        self._finished = False
        self._commit = CommitOutcome()
        self._coordinator = False

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.store = rebind(self.store, self._open_store, checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._rank = int(kwargs.get("rank", 0))
        self._written = []
        self._finished, self._commit = False, CommitOutcome()
        self._coordinator = is_coordinator
        self._base = self.base_loader() if self.base_loader is not None else None
        self.store.prepare()
        if is_coordinator and not self.overwrite:
            check_vacant(self.store)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Before anything is written: every key must go into the UTF-8 manifest (any planner).
        keys: set[str] = set()
        for plan in plans:
            keys.update(map(_FQN, plan.items))
        check_utf8_keys(keys)
        save_id = uuid.uuid4().hex[:12]
        return [
            replace(plan, storage_data=_FilePrefix(data_file_prefix(save_id, rank)))
            for rank, plan in enumerate(plans)
        ]

    def renew_plan(self, plan: SavePlan) -> SavePlan | None:
        """The plan under a fresh save id: its rank needs nothing else from the coordinator."""
        return replace(plan, storage_data=_FilePrefix(data_file_prefix(uuid.uuid4().hex[:12], self._rank)))

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        prefix = plan.storage_data.prefix
        sizes = [item.tensor_storage_size() or 0 for item in plan.items]
        bins = _split(plan.items, sizes, self.thread_count)
        names = [data_file_name(prefix, n) for n in range(len(bins))]
        self._written = list(names)
        self.store.ensure_capacity(sum(s + alignment(s) for s in sizes))
        try:
            if len(bins) <= 1:
                results = [
                    self._write_file(name, items, planner) for name, items in zip(names, bins, strict=True)
                ]
            else:
                with ThreadPoolExecutor(len(bins), thread_name_prefix="torchstow-write") as pool:
                    results = list(
                        pool.map(
                            lambda nb: self._write_file(nb[0], nb[1], planner), zip(names, bins, strict=True)
                        )
                    )
        except BaseException:
            # Leave no data of a failed save behind (it would hold space on
            # the store, in memory for shared memory, until the next save).
            with contextlib.suppress(Exception):
                self.store.delete_files(names)
            raise
        flat = [r for file_results in results for r in file_results]
        columns = LocationColumns.of(
            [r.index for r in flat], [r.storage_data for r in flat], [r.size_in_bytes for r in flat]
        )
        # A file whose every item was shared with the base holds nothing: no manifest may list it.
        used = columns.file_names()
        unused = [name for name in names if name not in used]
        if unused:
            self.store.delete_files(unused)
            self._written = [name for name in names if name in used]
        return completed_future(WrittenItems(columns))

    def _write_file(self, name: str, items: Sequence[Any], planner: SavePlanner) -> list[WriteResult]:
        sink = self.store.create(name)
        try:
            results = _write_items(
                sink, name, items, planner, self._base, self.store, self.digest_slots, self.compression
            )
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: every rank's results (columns, or :class:`WriteResult` objects from a
        writer of another kind, made columns here) become the manifest's chunk table."""
        self._finished, self._commit = True, CommitOutcome()
        batches = [location_columns(rank_results) for rank_results in results]
        metadata.committed_at = time.time()
        metadata.nbytes_written = sum(batch.bytes_written() for batch in batches)
        metadata.save_id = uuid.uuid4().hex  # this commit's own id (a cached plan reuses no coordinator step)
        metadata.version = self.format_version
        attach_locations(metadata, batches, chunk_table_name(metadata.save_id))
        locations = metadata.storage_data
        self._check_listed(locations)
        replaced = committed_files(self.store) if self.overwrite else set()
        self._publish(metadata)
        # Committed. Removing the replaced checkpoint's files is housekeeping:
        # a failure here must not report a committed save as failed. Files of
        # no committed manifest may belong to a save still in flight: kept.
        live = located_files(metadata)
        try:
            self.store.delete_files(sorted(replaced - live))
            if self.overwrite:  # a replaced DCP-format checkpoint: its .metadata must not outlive it
                self.store.delete_files(dcp_files(self.store.list_files()))
        except Exception:
            location = self.store.location
            logger.warning("checkpoint %s committed; removing stale files failed", location, exc_info=True)

    def _check_listed(self, locations: Mapping[Any, StorageInfo]) -> None:
        """Refuse to commit a manifest whose data is not all there: a file shared with
        a base that was removed or cut short meanwhile (by the cleanup of an overwrite
        committed in between, say) would make a checkpoint that does not load."""
        sizes = self.store.file_sizes() if locations else None
        if sizes is None:
            return
        missing = check_extents(locations.items(), sizes, self.store.location)
        for index, info in locations.items() if missing else ():
            if info.relative_path in missing:
                raise CorruptCheckpointError(
                    f"{self.store.location}/{info.relative_path}, which would hold {index.fqn!r}, is "
                    "missing (removed while this save was in flight): nothing was committed"
                )

    def _publish(self, metadata: Metadata) -> None:
        """Publish ``metadata`` as the location's manifest, its outcome noted for
        :meth:`commit_outcome` (decided by :func:`publish_manifest`)."""
        publish_manifest(self.store, metadata, overwrite=self.overwrite, outcome=self._commit)

    def commit_outcome(self) -> bool | None:
        """Whether this save committed: on the coordinator, what its ``finish`` saw (False
        if it never ran: nothing else publishes); elsewhere True when the manifest
        committed at the location lists a data file this rank wrote (their names carry
        this save's id), else None (unknown)."""
        if self._finished or self._coordinator:
            return self._commit.landed
        mine = set(self._written)
        return True if mine and mine & (self._listed() or set()) else None

    def _listed(self) -> set[str] | None:
        """The files the manifest committed at the location names now (None: unreadable),
        as a failed save's cleanup and read-back see them."""
        return listed_files(self.store)

    def abort(self) -> None:
        """Remove the data files this rank wrote for a save that certainly did not
        commit, and the base files it linked in, except any that the manifest
        committed at the location lists: a racing save that won may share them."""
        adopted = self._base.adopted if self._base is not None else []
        if not self._written and not adopted:
            return
        listed = self._listed()
        if self._written:
            self.store.delete_files([n for n in self._written if listed is None or n not in listed])
            self._written = []
        if adopted and listed is not None:  # unreadable: leave them (they are links, not bytes)
            self.store.delete_files([n for n in adopted if n not in listed])
        if self._base is not None:
            self._base.adopted = []

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


class _PackedFile:
    """Appends items to one data file: aligned, checksummed per block, and
    handed to the sink in segments.

    Each piece is checksummed right before it is queued for writing, so the
    bytes are read from memory once for both while still in cache; writing
    in segments lets the store start flushing early.
    """

    def __init__(self, sink: FileSink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.offset = 0
        self.queue: list[Buffer] = []
        self.queued_bytes = 0
        self.owners: list[Any] = []

    def add(self, view: memoryview, owner: Any, codec: str | None = None) -> StorageInfo:
        length = len(view)
        pad = -self.offset % alignment(length)
        if pad:
            self._queue(_ZEROS[:pad])
        start = self.offset
        self.owners.append(owner)
        if length <= _SEGMENT:
            checksums: tuple[int, ...] = (checksum(view, 0),) if length else ()
            self._queue(view)
        else:
            crcs = []
            for block_start in range(0, length, BLOCK_SIZE):
                crc = 0
                for pos in range(block_start, min(block_start + BLOCK_SIZE, length), _SEGMENT):
                    piece = view[pos : pos + _SEGMENT]
                    crc = checksum(piece, crc)
                    self._queue(piece)
                crcs.append(crc)
            checksums = tuple(crcs)
            if self.queue and (not self.owners or self.owners[-1] is not owner):
                # Flushed midway: its last pieces are queued, and the owner may be a buffer
                # nothing else holds (a compressed item, a contiguous copy).
                self.owners.append(owner)
        return StorageInfo(self.name, start, length, checksums, BLOCK_SIZE, codec=codec)

    def _queue(self, buf: Buffer) -> None:
        self.queue.append(buf)
        self.queued_bytes += len(buf)
        self.offset += len(buf)
        if self.queued_bytes >= _FLUSH_BYTES or len(self.queue) >= _QUEUE_ITEMS:
            self.flush()

    def flush(self) -> None:
        if self.queue:
            self.sink.write(self.queue)
        self.queue = []
        self.queued_bytes = 0
        self.owners = []


def _write_items(
    sink: FileSink,
    name: str,
    items: Sequence[Any],
    planner: SavePlanner,
    base: BaseContent | None = None,
    store: ByteStore | None = None,
    slots: DigestSlots | None = None,
    compression: str | None = None,
) -> list[WriteResult]:
    """Write ``items`` into one file; with a ``base``, tensors it already holds are
    referenced instead (a result of 0 bytes written) and the rest hashed as written.
    ``slots`` says where a tensor's digest may be remembered from an earlier save.
    With ``compression`` each item is compressed on its own before it is checksummed
    (and hashed): the manifest describes the stored bytes."""
    packed = _PackedFile(sink, name)
    results = []
    for item in items:
        data = planner.resolve_data(item)
        codec: str | None = None
        if isinstance(data, io.BytesIO):
            view = memoryview(data.getvalue())
            owner: Any = view
            if compression is not None:
                owner, view, codec = _stored(view, None, owner)
            info = packed.add(view, owner, codec)
        elif base is not None and store is not None and item.tensor_data is not None:
            slot = slots(data, _leaf(planner, item)) if slots is not None else None
            if slot is not None and compression is not None:  # digests of other stored bytes
                slot = slot._replace(view=(*slot.view, compression))
            known = slot.digest() if slot is not None else None
            if known is not None:  # unchanged by its version counter: no byte read
                # Compressed, its stored length is known only by compressing it: the digest decides.
                length = data.nbytes if compression is None else None
                found = base.reference_digest(item.index, length, known, store)
                if found is not None:
                    results.append(WriteResult(item.index, 0, found))
                    continue
            owner, view = as_host_bytes(data)
            if compression is not None:
                owner, view, codec = _stored(view, data.dtype, owner)
            found, digest = base.reference(item.index, view, store, codec)
            if slot is not None:
                if known is not None and known != digest:
                    _warn_stale(item.index.fqn)
                slot.remember(digest)
            if found is not None:
                results.append(WriteResult(item.index, 0, found))
                continue
            info = replace(packed.add(view, owner, codec), content_hash=digest)
        else:
            owner, view = as_host_bytes(data)
            if compression is not None:
                owner, view, codec = _stored(view, data.dtype, owner)
            info = packed.add(view, owner, codec)
        results.append(WriteResult(item.index, info.length, info))
    packed.flush()
    return results


def _stored(view: memoryview, dtype: torch.dtype | None, owner: Any) -> tuple[Any, memoryview, str | None]:
    """What is stored for an item of raw bytes ``view`` (held alive by ``owner``): its
    compressed bytes and codec, or the raw bytes themselves when compressing does not shrink them."""
    found = compress(view, dtype)
    if found is None:
        return owner, view, None
    stored, codec = found
    return stored, memoryview(stored) if isinstance(stored, bytes) else tensor_bytes(stored), codec


def _leaf(planner: SavePlanner, item: Any) -> Any:
    """The state-dict value ``item`` comes from, where the planner is torchstow's (else None)."""
    flat = getattr(planner, "flat", None) if isinstance(planner, DefaultSavePlanner) else None
    return flat.leaves.get(item.index.fqn) if flat is not None else None


def _warn_stale(fqn: str) -> None:
    logger.warning(
        "trust_version_counter: the bytes of %r changed without its version counter moving (a write "
        "through .data, NumPy, DLPack or a raw pointer?); it was hashed and written, but other tensors "
        "written that way may have been shared with the base unchanged",
        fqn,
    )
