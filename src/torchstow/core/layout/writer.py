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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from torchstow.core.layout.views import as_host_bytes, tensor_bytes
from torchstow.core.planning import LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, WriteResult, completed_future
from torchstow.core.storage.store import Buffer, ByteStore, FileSink
from torchstow.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from torchstow.format import chunks as chunk_math
from torchstow.format.checksums import BlockVerifier, checksum
from torchstow.format.codec import decode_metadata, encode_metadata
from torchstow.format.files import (
    BLOCK_SIZE,
    LARGE_ALIGN,
    LARGE_ITEM,
    MANIFEST,
    alignment,
    data_file_name,
    data_file_prefix,
    is_checkpoint_file,
    is_data_file,
)
from torchstow.format.manifest import (
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorStorageMetadata,
)

__all__ = ["LayoutReader", "LayoutWriter", "read_manifest"]

logger = logging.getLogger("torchstow")

_BATCH_BYTES = 32 << 20
_BATCH_ITEMS = 1024
_SEGMENT = 1 << 20
_FLUSH_BYTES = 8 << 20
_ZEROS = bytes(LARGE_ALIGN)

StoreOpener = Callable[[str], ByteStore]


def default_thread_count() -> int:
    """Threads per rank for moving bytes: the cores there are, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def read_manifest(store: ByteStore) -> Metadata:
    """The committed manifest of ``store``'s checkpoint.

    Raises CheckpointNotFoundError when nothing is there and
    IncompleteCheckpointError when data exists without a manifest.
    """
    try:
        data = store.read_file(MANIFEST)
    except FileNotFoundError:
        if any(is_checkpoint_file(name) for name in store.list_files()):
            raise IncompleteCheckpointError(
                f"{store.location} holds checkpoint data but no committed {MANIFEST}: the save "
                "that wrote it did not finish. Save again, or delete the location."
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint at {store.location}") from None
    return decode_metadata(data, source=f"{store.location}/{MANIFEST}")


def _rebind(store: ByteStore, opener: StoreOpener | None, checkpoint_id: Any) -> ByteStore:
    if checkpoint_id is None or str(checkpoint_id) == store.location:
        return store
    if opener is None:
        raise ValueError(
            f"this storage object is bound to {store.location}; create a new one for {checkpoint_id}"
        )
    return opener(str(checkpoint_id))


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


class LayoutWriter(StorageWriter):
    """A :class:`StorageWriter` over any :class:`ByteStore`.

    ``overwrite`` allows replacing a committed checkpoint (the old one stays
    loadable until the new manifest is published). ``thread_count`` is the
    number of files, and threads, per rank.
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
        self.thread_count = thread_count or default_thread_count()
        self._written: list[str] = []
        self._open_store = open_store

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.store = _rebind(self.store, self._open_store, checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.store.prepare()
        if is_coordinator and not self.overwrite and MANIFEST in self.store.list_files():
            raise CheckpointExistsError(
                f"a checkpoint already exists at {self.store.location}; pass overwrite=True to "
                "replace it (the old one stays valid until the new one commits)"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        save_id = uuid.uuid4().hex[:12]
        return [
            replace(plan, storage_data=_FilePrefix(data_file_prefix(save_id, rank)))
            for rank, plan in enumerate(plans)
        ]

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
                            lambda nb: self._write_file(nb[0], nb[1], planner),
                            zip(names, bins, strict=True),
                        )
                    )
        except BaseException:
            # Leave no data of a failed save behind (it would hold space on
            # the store, in memory for shared memory, until the next save).
            with contextlib.suppress(Exception):
                self.store.delete_files(names)
            raise
        return completed_future([r for file_results in results for r in file_results])

    def _write_file(self, name: str, items: Sequence[Any], planner: SavePlanner) -> list[WriteResult]:
        sink = self.store.create(name)
        try:
            results = _write_items(sink, name, items, planner)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        locations = {r.index: r.storage_data for rank_results in results for r in rank_results}
        metadata.storage_data = locations
        metadata.committed_at = time.time()
        manifest = encode_metadata(metadata)
        self.store.publish(MANIFEST, manifest)
        # Committed. Removing the replaced checkpoint's files is housekeeping:
        # a failure here must not report a committed save as failed.
        live = {info.relative_path for info in locations.values()}
        try:
            self.store.delete_files([f for f in self.store.list_files() if is_data_file(f) and f not in live])
        except Exception:
            location = self.store.location
            logger.warning("checkpoint %s committed; removing stale files failed", location, exc_info=True)

    def abort(self) -> None:
        """Remove the data files this rank wrote for the failed save."""
        if self._written:
            self.store.delete_files(self._written)
            self._written = []

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

    def add(self, view: memoryview, owner: Any) -> StorageInfo:
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
        return StorageInfo(self.name, start, length, checksums, BLOCK_SIZE)

    def _queue(self, buf: Buffer) -> None:
        self.queue.append(buf)
        self.queued_bytes += len(buf)
        self.offset += len(buf)
        if self.queued_bytes >= _FLUSH_BYTES or len(self.queue) >= _BATCH_ITEMS:
            self.flush()

    def flush(self) -> None:
        if self.queue:
            self.sink.write(self.queue)
        self.queue = []
        self.queued_bytes = 0
        self.owners = []


def _write_items(sink: FileSink, name: str, items: Sequence[Any], planner: SavePlanner) -> list[WriteResult]:
    packed = _PackedFile(sink, name)
    results = []
    for item in items:
        data = planner.resolve_data(item)
        if isinstance(data, io.BytesIO):
            view = memoryview(data.getvalue())
            owner: Any = view
        else:
            owner, view = as_host_bytes(data)
        info = packed.add(view, owner)
        results.append(WriteResult(item.index, info.length, info))
    packed.flush()
    return results


@dataclass
class _ReadTask:
    item: ReadItem
    info: StorageInfo
    target: torch.Tensor | None  # None for a non-tensor item
    dtype: torch.dtype | None
    chunk_sizes: torch.Size | None
    payload: bytes = b""


class LayoutReader(StorageReader):
    """A :class:`StorageReader` over any :class:`ByteStore`.

    Bytes are read straight into the destination tensors where the stored
    region maps onto their memory, and every byte read is checked against
    its block checksums unless ``verify_checksums`` is off.
    """

    def __init__(
        self,
        store: ByteStore,
        *,
        thread_count: int | None = None,
        verify_checksums: bool = True,
        open_store: StoreOpener | None = None,
    ) -> None:
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"thread_count must be at least 1, got {thread_count}")
        self.store = store
        self.thread_count = thread_count or default_thread_count()
        self.verify_checksums = verify_checksums
        self._open_store = open_store

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.store = _rebind(self.store, self._open_store, checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_manifest(self.store)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        # A checkpoint of JSON values only (or of nothing) has no data locations.
        locations = {} if metadata.storage_data is None else metadata.storage_data
        if not isinstance(locations, dict):
            raise CorruptCheckpointError(f"the manifest at {self.store.location} records no data locations")
        self.metadata = metadata
        self.locations: dict[MetadataIndex, StorageInfo] = locations

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        tasks = [self._task(item, planner) for item in plan.items]
        jobs = _jobs(_batches(tasks))
        threads = min(self.thread_count, len(jobs))
        if threads <= 1:
            for job in jobs:
                self._run_job(job)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="torchstow-read") as pool:
                for _ in pool.map(self._run_job, jobs):
                    pass
        for task in tasks:
            if task.target is not None:
                planner.commit_tensor(task.item, task.target)
            else:
                planner.load_bytes(task.item, io.BytesIO(task.payload))
        return completed_future(None)

    def _task(self, item: ReadItem, planner: LoadPlanner) -> _ReadTask:
        info = self.locations.get(item.storage_index)
        if info is None:
            raise CorruptCheckpointError(
                f"the manifest at {self.store.location} has no data location for {item.storage_index}"
            )
        if item.type == LoadItemType.BYTE_IO:
            return _ReadTask(item, info, None, None, None)
        entry = self.metadata.state_dict_metadata[item.storage_index.fqn]
        assert isinstance(entry, TensorStorageMetadata)
        chunk = _stored_chunk(entry, item.storage_index)
        return _ReadTask(item, info, planner.resolve_tensor(item), entry.properties.dtype, chunk)

    def _run_job(self, job: list[tuple[str, list[_ReadTask]]]) -> None:
        for file, batch in job:
            self._read_batch(file, batch)

    def _read_batch(self, file: str, tasks: list[_ReadTask]) -> None:
        """Read a batch in segments of the store's preferred size, verifying
        each segment right after it arrives, while its bytes are in cache."""
        reads = [_plan_read(task) for task in tasks]
        limit = self.store.read_segment_bytes
        segment: list[tuple[int, memoryview, _PlannedRead]] = []
        size = 0
        for read in reads:
            for offset, buf in read.pieces:
                for pos in range(0, len(buf), limit):
                    piece = buf[pos : pos + limit] if len(buf) > limit else buf
                    segment.append((offset + pos, piece, read))
                    size += len(piece)
                    if size >= limit:
                        self._read_segment(file, segment)
                        segment = []
                        size = 0
        if segment:
            self._read_segment(file, segment)
        for read in reads:
            read.finish(self.store.location, self.verify_checksums)

    def _read_segment(self, file: str, segment: list[tuple[int, memoryview, _PlannedRead]]) -> None:
        try:
            self.store.read_into(file, [(offset, buf) for offset, buf, _ in segment])
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"{self.store.location}/{file} is missing, though the committed manifest lists it "
                f"(it holds {segment[0][2].task.item.storage_index.fqn!r}): the checkpoint is damaged"
            ) from exc
        if self.verify_checksums:
            location = self.store.location
            for _, buf, read in segment:
                read.check(buf, location)


def _stored_chunk(entry: TensorStorageMetadata, index: MetadataIndex) -> torch.Size:
    hint = index.index
    if hint is not None and hint < len(entry.chunks) and entry.chunks[hint].offsets == index.offset:
        return entry.chunks[hint].sizes
    for chunk in entry.chunks:
        if chunk.offsets == index.offset:
            return chunk.sizes
    raise CorruptCheckpointError(f"the manifest has no chunk for {index}")


def _batches(tasks: list[_ReadTask]) -> dict[str, list[list[_ReadTask]]]:
    """Group tasks by file in offset order, cut into batches of bounded size."""
    by_file: dict[str, list[_ReadTask]] = {}
    for task in tasks:
        by_file.setdefault(task.info.relative_path, []).append(task)
    out: dict[str, list[list[_ReadTask]]] = {}
    for file, file_tasks in by_file.items():
        file_tasks.sort(key=lambda t: t.info.offset)
        batches: list[list[_ReadTask]] = [[]]
        size = 0
        for task in file_tasks:
            if batches[-1] and (size >= _BATCH_BYTES or len(batches[-1]) >= _BATCH_ITEMS):
                batches.append([])
                size = 0
            batches[-1].append(task)
            size += task.info.length
        out[file] = batches
    return out


def _jobs(batches: dict[str, list[list[_ReadTask]]]) -> list[list[tuple[str, list[_ReadTask]]]]:
    """Group batches into jobs for the reader threads.

    Batches of large items become a job each, to run in parallel; batches of
    small items (mostly GIL-bound Python work) share one job, as in the writer.
    """
    jobs: list[list[tuple[str, list[_ReadTask]]]] = []
    small: list[tuple[str, list[_ReadTask]]] = []
    for file, file_batches in batches.items():
        for batch in file_batches:
            nbytes = sum(task.info.length for task in batch)
            if nbytes >= LARGE_ITEM * len(batch):
                jobs.append([(file, batch)])
            else:
                small.append((file, batch))
    if small:
        jobs.append(small)
    return jobs


class _PlannedRead:
    """The byte ranges one task reads, its checksum verifier, and how to finish it."""

    __slots__ = ("direct", "pieces", "scratch", "strided_view", "task", "verifier")

    def __init__(self, task: _ReadTask) -> None:
        self.task = task
        self.pieces: list[tuple[int, memoryview]] = []
        self.verifier: BlockVerifier | None = None
        self.direct: torch.Tensor | None = None
        self.scratch: Any = None
        self.strided_view: torch.Tensor | None = None

    def check(self, data: memoryview, location: str) -> None:
        """Verify the next bytes of this task (they arrive in order)."""
        if self.verifier is not None:
            self._raise_if_bad(self.verifier.feed(data), location)

    def finish(self, location: str, verify: bool) -> None:
        """Check the last block, then move the bytes where they belong."""
        if verify and self.verifier is not None:
            self._raise_if_bad(self.verifier.end(), location)
        task = self.task
        if task.target is None:
            task.payload = bytes(self.pieces[0][1])
        elif self.strided_view is not None:
            with torch.no_grad():
                task.target.copy_(self.strided_view)
        elif self.direct is not None and self.direct is not task.target:
            with torch.no_grad():
                task.target.copy_(self.direct)

    def _raise_if_bad(self, bad: int | None, location: str) -> None:
        if bad is None:
            return
        info = self.task.info
        block = info.block_size or info.length
        lo = info.offset + bad * block
        hi = info.offset + min(info.length, (bad + 1) * block)
        raise ChecksumMismatchError(
            f"checksum mismatch in {self.task.item.storage_index.fqn!r}: {location}/{info.relative_path} "
            f"bytes {lo}..{hi} differ from what was saved; the checkpoint is corrupted"
        )


def _plan_read(task: _ReadTask) -> _PlannedRead:
    info = task.info
    read = _PlannedRead(task)
    block = info.block_size or max(info.length, 1)
    if task.target is None:
        buf = memoryview(bytearray(info.length))
        read.pieces = [(info.offset, buf)]
        read.verifier = BlockVerifier(0, info.checksums, block)
        return read
    assert task.dtype is not None
    assert task.chunk_sizes is not None
    item = task.item
    target = task.target
    direct = target.is_cpu and target.dtype == task.dtype and target.is_contiguous()
    if direct and item.lengths == task.chunk_sizes:
        # The common case: a whole stored chunk straight into its target.
        read.direct = target
        if info.length:
            read.pieces = [(info.offset, tensor_bytes(target))]
            read.verifier = BlockVerifier(0, info.checksums, block)
        return read
    itemsize = task.dtype.itemsize
    span = chunk_math.contiguous_span(task.chunk_sizes, item.storage_offsets, item.lengths)
    if span is not None:
        start = span[0] * itemsize
        length = span[1] * itemsize
        if length == 0:
            return read
        dest = target if direct else torch.empty(item.lengths, dtype=task.dtype)
        read.direct = dest
        body = tensor_bytes(dest)
    else:
        # A strided region: read the rows from its first to its last byte.
        strides = _row_major_strides(task.chunk_sizes)
        first = sum(o * s for o, s in zip(item.storage_offsets, strides, strict=True))
        last = first + sum((n - 1) * s for n, s in zip(item.lengths, strides, strict=True))
        start = first * itemsize
        length = (last + 1 - first) * itemsize
        raw = torch.empty(length, dtype=torch.uint8)
        body = tensor_bytes(raw)
        read.strided_view = raw.view(task.dtype).as_strided(item.lengths, strides, 0)
        read.scratch = raw
    # Extend the read to whole checksum blocks so every byte read is verified.
    head_start = (start // block) * block
    tail_end = min(info.length, -(-(start + length) // block) * block)
    if head_start < start:
        read.pieces.append((info.offset + head_start, memoryview(bytearray(start - head_start))))
    read.pieces.append((info.offset + start, body))
    if start + length < tail_end:
        read.pieces.append((info.offset + start + length, memoryview(bytearray(tail_end - start - length))))
    read.verifier = BlockVerifier(head_start // block, info.checksums, block)
    return read


def _row_major_strides(sizes: Sequence[int]) -> list[int]:
    strides = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    return strides
