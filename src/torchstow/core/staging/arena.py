"""Shared-memory segments that hold staged storages another process reads.

A :class:`SharedMemoryArena` carves staged storages out of segments: files in
``/dev/shm`` (the system temp dir where there is none) mapped into this
process. Another process that learns a segment's name maps the same pages
(:class:`SegmentMapper`), so tensor bytes never travel through a pipe. Small
storages share slabs; a large one gets a segment of its own. Once no staged
storage uses a segment any more, its file is removed and its pages go back
to the system when the last mapping closes.

Segment files are named ``torchstow-<pid>-<random>``; a process killed by
SIGKILL before it could clean up leaves them behind, and they can be deleted.
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
from typing import Any

import torch

__all__ = ["SHM_DIR", "SegmentMapper", "SharedMemoryArena", "ShmRef"]

logger = logging.getLogger("torchstow")

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_PREFIX = "torchstow-"
_PAGE = mmap.PAGESIZE
_SLAB = 64 << 20
_SMALL_ALIGN = 64


@dataclass(frozen=True)
class ShmRef:
    """Where a storage lives: ``nbytes`` at ``offset`` in the segment ``segment``."""

    segment: str
    offset: int
    nbytes: int


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class _Segment:
    """One mapped segment file, filled front to back."""

    __slots__ = ("base", "live", "mapping", "name", "path", "pinned", "size", "used", "view")

    def __init__(self, size: int) -> None:
        self.name = f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mapping = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self.mapping)
        self.size = size
        self.used = 0
        self.live = 0
        self.base = torch.frombuffer(self.view, dtype=torch.uint8).data_ptr()
        self.pinned = False

    def carve(self, nbytes: int) -> torch.UntypedStorage:
        align = _PAGE if nbytes >= (1 << 20) else _SMALL_ALIGN
        start = _round_up(self.used, align)
        self.used = start + nbytes
        self.live += 1
        return torch.frombuffer(self.view[start : start + nbytes], dtype=torch.uint8).untyped_storage()

    def fits(self, nbytes: int) -> bool:
        return _round_up(self.used, _SMALL_ALIGN) + nbytes <= self.size

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # the reading process took ownership
            os.unlink(self.path)


_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's


def _cuda_host_register(ptr: int, size: int) -> bool:
    result = torch.cuda.cudart().cudaHostRegister(ptr, size, _HOST_REGISTER_PORTABLE)
    if int(result) != 0:
        logger.warning("could not pin a %d-byte shared-memory segment (CUDA error %s)", size, result)
        return False
    return True


def _unlink_all(segments: dict[str, _Segment]) -> None:
    for segment in list(segments.values()):
        segment.unlink()


class SharedMemoryArena:
    """Allocates storages in shared memory and says where each one lives.

    ``pin`` registers every segment with CUDA as page-locked memory, so
    device-to-host copies into it are asynchronous. Thread-safe. Segment
    files are removed when their storages die, at :meth:`close`, when the
    arena is collected, and at interpreter exit.
    """

    def __init__(self, *, pin: bool = False, slab_bytes: int = _SLAB) -> None:
        self.pin = pin
        self.slab_bytes = slab_bytes
        self._lock = threading.Lock()
        self._segments: dict[str, _Segment] = {}
        self._bases: list[tuple[int, str]] = []
        self._slab: _Segment | None = None
        self._dead: list[str] = []  # appended by finalizers, which must not take the lock
        self._released: list[str] = []
        self._closed = False
        weakref.finalize(self, _unlink_all, self._segments)

    def allocate(self, nbytes: int) -> torch.UntypedStorage:
        """A new shared storage of ``nbytes`` (an ordinary empty one for 0)."""
        if nbytes == 0:
            return torch.UntypedStorage(0)
        with self._lock:
            if self._closed:
                raise RuntimeError("this shared-memory arena is closed")
            self._reap()
            if nbytes >= self.slab_bytes // 2:
                segment = self._new_segment(_round_up(nbytes, _PAGE))
            else:
                if self._slab is None or not self._slab.fits(nbytes):
                    full, self._slab = self._slab, self._new_segment(self.slab_bytes)
                    if full is not None and full.live == 0:
                        self._drop(full)
                segment = self._slab
            storage = segment.carve(nbytes)
        weakref.finalize(storage, self._dead.append, segment.name)
        return storage

    def _new_segment(self, size: int) -> _Segment:
        segment = _Segment(size)
        if self.pin:
            segment.pinned = _cuda_host_register(segment.base, size)
        self._segments[segment.name] = segment
        bisect.insort(self._bases, (segment.base, segment.name))
        return segment

    def _reap(self) -> None:
        """Account for storages that died; drop segments no storage uses (lock held)."""
        while self._dead:
            segment = self._segments.get(self._dead.pop())
            if segment is None:
                continue
            segment.live -= 1
            if segment.live == 0 and segment is not self._slab:
                self._drop(segment)

    def _drop(self, segment: _Segment) -> None:
        del self._segments[segment.name]
        self._bases.remove((segment.base, segment.name))
        if segment.pinned:
            torch.cuda.cudart().cudaHostUnregister(segment.base)
        segment.unlink()
        self._released.append(segment.name)

    def locate(self, storage: torch.UntypedStorage) -> ShmRef | None:
        """Where ``storage`` lives, or None if it is not in this arena."""
        nbytes = storage.nbytes()
        if nbytes == 0:
            return ShmRef("", 0, 0)
        ptr = storage.data_ptr()
        with self._lock:
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
            self._slab = None


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
