"""The layout reader: reads stored items straight into their target tensors where the
layout allows, in batches per file over ``thread_count`` threads, verifying every byte."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torchstow.core.futures import completed_future
from torchstow.core.layout.dcp_reader import DcpItems
from torchstow.core.layout.location import StoreOpener, default_thread_count, read_manifest, rebind
from torchstow.core.layout.read_plan import PlannedRead, ReadTask, plan_read
from torchstow.core.planning import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torchstow.core.process_local import ProcessLocal
from torchstow.core.storage.interfaces import StorageReader
from torchstow.core.storage.store import ByteStore
from torchstow.errors import ChecksumMismatchError, CorruptCheckpointError
from torchstow.format import chunks as chunk_math
from torchstow.format.dcp_metadata import DcpLocations
from torchstow.format.files import LARGE_ITEM
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata
from torchstow.format.validation import check_extents, missing_file_error

__all__ = ["LayoutReader", "raise_if_missing", "require_data"]

_BATCH_BYTES = 64 << 20  # 32 MiB: 2 to 4 ms more CPU per GiB loaded (more jobs handed over)
_BATCH_ITEMS = 1024

#: Reader threads kept from load to load, at most (started as loads ask for them); a load
#: asking for more starts the others for itself, and they end with it.
_KEPT_READERS = 16

_Job = list[tuple[str, list[ReadTask]]]  # batches of one file's tasks each: what one thread reads


class LayoutReader(StorageReader):
    """A :class:`StorageReader` over any :class:`ByteStore`.

    Bytes are read straight into the destination tensors where the stored
    region maps onto their memory, and every byte read is checked against
    its block checksums unless ``verify_checksums`` is off.

    Where the location holds no torchstow manifest but a DCP ``.metadata``
    (a checkpoint of stock ``dcp.save``), that is the manifest read, and the
    items are read in DCP's format (:mod:`torchstow.core.layout.dcp_reader`).
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
        self._missing: set[str] = set()  # listed data files not present
        self._beyond: dict[MetadataIndex, str] = {}  # items past their file's end: the error
        self._checked: Metadata | None = None  # the manifest they were looked up for

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.store = rebind(self.store, self._open_store, checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_manifest(self.store, dcp=True)
        self._check_files(metadata)
        return metadata

    def _check_files(self, metadata: Metadata) -> None:
        """Every item of ``metadata`` inside its file, and which listed files are missing."""
        if metadata is self._checked:
            return
        self._missing = set()
        self._beyond = {}
        if isinstance(metadata.storage_data, Mapping) and metadata.storage_data:
            sizes = self.store.file_sizes()
            if sizes is not None:
                self._missing = check_extents(
                    metadata.storage_data.items(), sizes, self.store.location, self._beyond
                )
        self._checked = metadata

    def require_data(self, metadata: Metadata, keys: Iterable[str]) -> None:
        """Raise CorruptCheckpointError if an item of ``keys`` lies in a missing file or
        past the end of its file (checked before anything is allocated for them),
        whoever read ``metadata``."""
        self._check_files(metadata)
        raise_if_missing(self.store.location, metadata.storage_data, self._missing, keys, self._beyond)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        # A checkpoint of JSON values only (or of nothing) has no data locations.
        locations = {} if metadata.storage_data is None else metadata.storage_data
        if not isinstance(locations, Mapping):
            raise CorruptCheckpointError(f"the manifest at {self.store.location} records no data locations")
        self.metadata = metadata
        self.locations: Mapping[MetadataIndex, StorageInfo] = locations

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        if isinstance(self.locations, DcpLocations):
            self._check_files(self.metadata)
            DcpItems(self.store, self.metadata, self._missing, self._beyond).read(plan, planner)
            return completed_future(None)
        tasks = [self._task(item, planner) for item in plan.items]
        jobs = _jobs(_batches(tasks), self.thread_count)
        threads = min(self.thread_count, len(jobs))
        # Each job's items are committed as soon as it and the jobs before it are read
        # (a read-once load sends them on while the rest is read).
        if threads <= 1:
            for job in jobs:
                self._commit(self._run_job(job), planner)
        else:
            _SharedJobs(jobs, self._run_job).run(threads, lambda job: self._commit(job, planner))
        return completed_future(None)

    def _commit(self, job: _Job, planner: LoadPlanner) -> None:
        for _, batch in job:
            for task in batch:
                if task.target is not None:
                    planner.commit_tensor(task.item, task.target)
                    continue
                try:
                    planner.load_bytes(task.item, io.BytesIO(task.payload))
                except CorruptCheckpointError as exc:
                    where = f"{self.store.location}/{task.info.relative_path}"
                    raise CorruptCheckpointError(f"{where}: {exc}") from exc

    def _task(self, item: ReadItem, planner: LoadPlanner) -> ReadTask:
        info = self.locations.get(item.storage_index)
        if info is None:
            raise CorruptCheckpointError(
                f"the manifest at {self.store.location} has no data location for {item.storage_index}"
            )
        if info.relative_path in self._missing:
            raise missing_file_error(self.store.location, info.relative_path, item.storage_index.fqn)
        if item.storage_index in self._beyond:
            raise CorruptCheckpointError(self._beyond[item.storage_index])
        if item.type == LoadItemType.BYTE_IO:
            return ReadTask(item, info, None, None, None)
        entry = self.metadata.state_dict_metadata[item.storage_index.fqn]
        assert isinstance(entry, TensorStorageMetadata)
        chunk = chunk_math.stored_chunk_sizes(entry, item.storage_index)
        return ReadTask(item, info, planner.resolve_tensor(item), entry.properties.dtype, chunk)

    def _run_job(self, job: _Job) -> _Job:
        for file, batch in job:
            self._read_batch(file, batch)
        return job

    def _read_batch(self, file: str, tasks: list[ReadTask]) -> None:
        """Read a batch in pieces of at most the store's segment size, in file order,
        verifying each piece as soon as it lands, while its bytes are in cache."""
        reads = [plan_read(task) for task in tasks]
        limit = self.store.read_segment_bytes
        requests: list[tuple[int, memoryview]] = []
        owners: list[PlannedRead] = []
        for read in reads:
            for offset, buf in read.pieces:
                for pos in range(0, max(len(buf), 1), limit):  # an empty piece is one request too
                    requests.append((offset + pos, buf[pos : pos + limit]))
                    owners.append(read)
        location = self.store.location
        verify = self.verify_checksums
        # Each request's verifier, looked up once: a piece landing costs one call to it.
        feeds = [read.verifier.feed if verify and read.verifier else None for read in owners]
        done = 0  # requests landed so far: the next one is where a failed read was

        def landed(i: int) -> None:
            nonlocal done
            done = i + 1
            feed = feeds[i]
            if feed is not None:
                bad = feed(requests[i][1])
                if bad is not None:
                    owners[i].fail(bad, location)

        try:
            if requests:  # a batch of empty items reads nothing
                self.store.read_in_order(file, requests, landed)
        except FileNotFoundError as exc:
            raise missing_file_error(location, file, owners[done].task.item.storage_index.fqn) from exc
        except ChecksumMismatchError:
            raise
        except CorruptCheckpointError as exc:
            keys = sorted({read.task.item.storage_index.fqn for read in owners[done : done + 8]})
            raise CorruptCheckpointError(f"{exc} (reading {', '.join(map(repr, keys[:3]))})") from exc
        for read in reads:
            read.finish(location, verify)


class _SharedJobs:
    """Jobs read by ``threads`` kept reader threads, each taking the next job in order,
    while the calling thread commits each job once it and every job before it are read.

    After a failure no job is started; the first failed job's error is raised, in order,
    once the other threads have finished the jobs they took.
    """

    def __init__(self, jobs: list[_Job], run: Callable[[_Job], Any]) -> None:
        self._jobs = jobs
        self._run = run
        self._taken = 0
        self._stop = False
        self._done: list[BaseException | bool] = [False] * len(jobs)  # True, or the job's error
        self._changed = threading.Condition()

    def run(self, threads: int, commit: Callable[[_Job], None]) -> None:
        """Read every job on ``threads`` threads, handing each to ``commit`` in order."""
        kept = min(threads, _KEPT_READERS)
        try:
            pool = _READERS.get()
            for _ in range(kept):
                pool.submit(self._work)
            for i in range(threads - kept):
                threading.Thread(target=self._work, name=f"torchstow-read-extra_{i}").start()
        except RuntimeError:  # the interpreter is shutting down: no new work for the pool
            self._work()
        try:
            self._commit_ready(commit)
        except BaseException:
            with self._changed:
                self._stop = True  # the readers finish the jobs they took, and take no more
                while False in self._done[: self._taken]:
                    self._changed.wait()
            raise

    def _take(self) -> int | None:
        with self._changed:
            if self._stop or self._taken == len(self._jobs):
                return None
            self._taken += 1
            return self._taken - 1

    def _read(self, i: int) -> None:
        outcome: BaseException | bool = True
        try:
            self._run(self._jobs[i])
        except BaseException as exc:
            outcome = exc
        with self._changed:
            self._done[i] = outcome
            if outcome is not True:
                self._stop = True
            self._changed.notify()

    def _work(self) -> None:
        while (i := self._take()) is not None:
            self._read(i)

    def _commit_ready(self, commit: Callable[[_Job], None]) -> None:
        """Commit every job in order, waiting for each to be read; raises a failed job's error."""
        for i, job in enumerate(self._jobs):
            with self._changed:
                while self._done[i] is False:
                    self._changed.wait()
                outcome = self._done[i]
            if isinstance(outcome, BaseException):
                raise outcome
            commit(job)


#: The reader threads, kept from load to load in this process: a thread started per load
#: made the load wait until it first ran (1-2 ms on a busy machine).
_READERS = ProcessLocal(lambda: ThreadPoolExecutor(_KEPT_READERS, thread_name_prefix="torchstow-read"))


def require_data(reader: StorageReader, metadata: Metadata, keys: Iterable[str]) -> None:
    """Raise CorruptCheckpointError if an item of ``keys`` lies in a data file that is
    missing (or holds less than the manifest places in it), where ``reader`` can tell.

    Call it before allocating anything for the items: a manifest's claims
    (a tensor's shape) must not size an allocation for data that is not there.
    """
    check = getattr(reader, "require_data", None)
    if check is not None:
        check(metadata, keys)


def raise_if_missing(
    location: str,
    locations: Any,
    missing: set[str],
    keys: Iterable[str],
    beyond: Mapping[Any, str] | None = None,
) -> None:
    """Raise the missing-file error for the first item of ``keys`` stored in a ``missing``
    file, or the error ``beyond`` records for one past its file's end."""
    if not (missing or beyond) or not isinstance(locations, Mapping):
        return
    wanted = set(keys)
    for index, info in locations.items():
        if index.fqn not in wanted:
            continue
        if info.relative_path in missing:
            raise missing_file_error(location, info.relative_path, index.fqn)
        if beyond and index in beyond:
            raise CorruptCheckpointError(beyond[index])


def _batches(tasks: list[ReadTask]) -> dict[str, list[list[ReadTask]]]:
    """Group tasks by file in offset order, cut into batches of bounded size."""
    by_file: dict[str, list[ReadTask]] = {}
    for task in tasks:
        by_file.setdefault(task.info.relative_path, []).append(task)
    out: dict[str, list[list[ReadTask]]] = {}
    for file, file_tasks in by_file.items():
        file_tasks.sort(key=lambda t: t.info.offset)
        batches: list[list[ReadTask]] = [[]]
        size = 0
        for task in file_tasks:
            if batches[-1] and (size >= _BATCH_BYTES or len(batches[-1]) >= _BATCH_ITEMS):
                batches.append([])
                size = 0
            batches[-1].append(task)
            size += task.info.length
        out[file] = batches
    return out


def _jobs(batches: dict[str, list[list[ReadTask]]], threads: int) -> list[_Job]:
    """Group batches into jobs for ``threads`` reader threads.

    Batches of large items become a job each, to run in parallel; batches of
    small items (mostly GIL-bound Python work) share one job, as in the writer.
    With several threads, the last ``threads`` batches of large items are cut into
    a job per item, so that the threads run out of work at about the same time.
    """
    large: list[tuple[str, list[ReadTask]]] = []
    small: _Job = []
    for file, file_batches in batches.items():
        for batch in file_batches:
            nbytes = sum(task.info.length for task in batch)
            if nbytes >= LARGE_ITEM * len(batch):
                large.append((file, batch))
            else:
                small.append((file, batch))
    cut = len(large) - threads if threads > 1 else len(large)
    jobs: list[_Job] = [[pair] for pair in large[:cut]]
    jobs += [[(file, [task])] for file, batch in large[cut:] for task in batch]
    if small:
        jobs.append(small)
    return jobs
