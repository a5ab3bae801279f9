"""Shared-memory segments that hold staged storages another process reads.

A :class:`SharedMemoryArena` gives each staged storage a segment of its own:
a file in ``/dev/shm`` (the system temp dir where there is none) that torch
maps as a shared storage (``UntypedStorage.from_file(..., shared=True)``),
so ``is_shared()`` is true for every staged tensor and torch's own
multiprocessing hands them on without copying. Another process that learns
a segment's name maps the same pages (:class:`SegmentMapper`), so tensor
bytes never travel through a pipe. Once its storage dies (or the arena is
closed) a segment's file is removed, and its pages go back to the system
when the last mapping closes.

Segment files are named ``torchstow-<pid>-<random>``. A process killed by
SIGKILL cannot clean up; its checkpoint writer process removes what is left
of its files when it sees the trainer gone (:func:`remove_segments_of`), and
any left otherwise can be deleted.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch

__all__ = ["SHM_DIR", "SegmentMapper", "SharedMemoryArena", "ShmRef", "locate_shared", "remove_segments_of"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_PREFIX = "torchstow-"
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class ShmRef:
    """Where a storage lives: ``nbytes`` at ``offset`` in the segment ``segment``."""

    segment: str
    offset: int
    nbytes: int


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class _Segment:
    """One segment file, mapped by torch as the shared storage it holds (not kept here)."""

    __slots__ = ("base", "name", "path", "pinned", "size")

    def __init__(self, name: str, base: int, size: int) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.base = base
        self.size = size
        self.pinned = False

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # the reading process took ownership
            os.unlink(self.path)


def _new_shared_storage(nbytes: int) -> tuple[str, torch.UntypedStorage]:
    """A new segment file of ``nbytes`` (a whole number of pages) mapped as a torch shared storage."""
    name = f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # never someone else's file
    try:
        os.ftruncate(fd, _round_up(nbytes, _PAGE))
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    try:
        storage = cast(torch.UntypedStorage, torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes))
    except BaseException:
        os.unlink(path)
        raise
    return name, storage


_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's


def _cuda_host_register(ptr: int, size: int) -> bool:
    result = torch.cuda.cudart().cudaHostRegister(ptr, size, _HOST_REGISTER_PORTABLE)
    if int(result) != 0:
        logger.warning("could not pin a %d-byte shared-memory segment (CUDA error %s)", size, result)
        return False
    return True


def _storage_died(dead: list[str], name: str, pinned_base: int | None) -> None:
    """A staged storage is being freed: unpin its pages first, and tell the arena (lock-free)."""
    if pinned_base is not None:
        torch.cuda.cudart().cudaHostUnregister(pinned_base)
    dead.append(name)


def _unlink_all(segments: dict[str, _Segment]) -> None:
    for segment in list(segments.values()):
        segment.unlink()


_arenas: weakref.WeakSet[SharedMemoryArena] = weakref.WeakSet()


def locate_shared(storage: torch.UntypedStorage) -> tuple[SharedMemoryArena, ShmRef] | None:
    """The arena of this process ``storage`` lives in, and where; None if in none."""
    for arena in list(_arenas):
        where = arena.locate(storage)
        if where is not None:
            return arena, where
    return None


def remove_segments_of(pid: int) -> int:
    """Remove the segment files process ``pid`` left (it is gone); how many there were."""
    prefix = f"{_PREFIX}{pid}-"
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed += 1
    return removed


class SharedMemoryArena:
    """Allocates torch shared storages, one segment each, and says where each one lives.

    ``pin`` registers every segment with CUDA as page-locked memory, so
    device-to-host copies into it are asynchronous. Thread-safe. Segment
    files are removed when their storages die, at :meth:`close`, when the
    arena is collected, and at interpreter exit.
    """

    def __init__(self, *, pin: bool = False) -> None:
        self.pin = pin
        self._lock = threading.Lock()
        self._segments: dict[str, _Segment] = {}
        self._bases: list[tuple[int, str]] = []
        self._dead: list[str] = []  # appended by finalizers, which must not take the lock
        self._released: list[str] = []
        self._closed = False
        weakref.finalize(self, _unlink_all, self._segments)
        _arenas.add(self)

    def allocate(self, nbytes: int) -> torch.UntypedStorage:
        """A new shared storage of ``nbytes`` (an empty shared one for 0)."""
        if nbytes == 0:
            return torch.UntypedStorage(0).share_memory_()
        with self._lock:
            if self._closed:
                raise RuntimeError("this shared-memory arena is closed")
            self._reap()
            name, storage = _new_shared_storage(nbytes)
            segment = _Segment(name, storage.data_ptr(), nbytes)
            if self.pin:
                segment.pinned = _cuda_host_register(segment.base, _round_up(nbytes, _PAGE))
            self._segments[name] = segment
            bisect.insort(self._bases, (segment.base, name))
        weakref.finalize(storage, _storage_died, self._dead, name, segment.base if segment.pinned else None)
        return storage

    def _reap(self) -> None:
        """Drop the segments whose storages died (lock held)."""
        while self._dead:
            segment = self._segments.get(self._dead.pop())
            if segment is not None:
                self._drop(segment)

    def _drop(self, segment: _Segment) -> None:
        del self._segments[segment.name]
        self._bases.remove((segment.base, segment.name))
        segment.unlink()
        self._released.append(segment.name)

    def locate(self, storage: torch.UntypedStorage) -> ShmRef | None:
        """Where ``storage`` lives, or None if it is not in this arena."""
        nbytes = storage.nbytes()
        if nbytes == 0:
            return ShmRef("", 0, 0)
        ptr = storage.data_ptr()
        with self._lock:
            self._reap()  # a dead storage's addresses may already hold another's
            i = bisect.bisect_right(self._bases, (ptr, "\uffff")) - 1
            if i < 0:
                return None
            base, name = self._bases[i]
            segment = self._segments[name]
            if ptr + nbytes > base + segment.size:
                return None
            return ShmRef(name, ptr - base, nbytes)

    def take_released(self) -> list[str]:
        """Names of segments freed since the last call (a reader may unmap them)."""
        with self._lock:
            self._reap()
            released, self._released = self._released, []
        return released

    def segment_names(self) -> set[str]:
        """The names of the segments in use (their files, until a reader maps them)."""
        with self._lock:
            self._reap()
            return set(self._segments)

    def stats(self) -> tuple[int, int]:
        """(segments, bytes mapped)."""
        with self._lock:
            self._reap()
            return len(self._segments), sum(s.size for s in self._segments.values())

    def close(self) -> None:
        """Remove every segment file. Storages still referenced stay readable
        until they are dropped, and their memory is returned then."""
        with self._lock:
            self._closed = True
            for segment in list(self._segments.values()):
                self._drop(segment)


class SegmentMapper:
    """The reading side: maps segments by name and builds storages over them.

    A segment's file is removed as soon as it is mapped, so nothing is left in
    ``/dev/shm`` if both processes die later; the mapping stays valid until
    :meth:`release`.
    """

    def __init__(self) -> None:
        self._maps: dict[str, Any] = {}

    def storage(self, ref: ShmRef) -> torch.UntypedStorage:
        """A storage over the bytes ``ref`` names (no copy)."""
        if ref.nbytes == 0:
            return torch.UntypedStorage(0)
        view = self._maps.get(ref.segment)
        if view is None:
            view = self._maps[ref.segment] = self._map(ref.segment)
        if ref.offset + ref.nbytes > len(view):
            raise ValueError(f"{ref} lies outside its segment of {len(view)} bytes")
        piece = view[ref.offset : ref.offset + ref.nbytes]
        return torch.frombuffer(piece, dtype=torch.uint8).untyped_storage()

    @staticmethod
    def _map(name: str) -> memoryview:
        if os.sep in name or not name.startswith(_PREFIX):
            raise ValueError(f"{name!r} is not a torchstow shared-memory segment")
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        os.unlink(path)
        return memoryview(mapping)

    def release(self, names: list[str] | tuple[str, ...]) -> None:
        """Forget the given segments (their pages go once no tensor uses them)."""
        for name in names:
            self._maps.pop(name, None)

    def close(self) -> None:
        """Forget every segment."""
        self._maps.clear()
