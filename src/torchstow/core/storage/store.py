"""The byte-store interface: the small surface a storage plugin implements.

A store holds the named files of one checkpoint location (a directory, an
object prefix, a shared-memory folder). The core's layout writer and reader
(:mod:`torchstow.core.layout.writer`) do everything else: packing, alignment,
checksums, manifest, commit order.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

from torchstow.errors import CorruptCheckpointError, StorageFullError, StorageIOError
from torchstow.format.files import too_large

__all__ = [
    "ByteStore",
    "FileSink",
    "NotDurableError",
    "PendingUpload",
    "StorageFullError",
    "StorageIOError",
    "read_bounded",
    "read_capped",
]

Buffer = memoryview | bytes | bytearray

logger = logging.getLogger(__name__)


class NotDurableError(StorageIOError):
    """A store's :meth:`ByteStore.publish` (or ``publish_new``) put the file in place, but
    could not make it durable (an ``fsync`` that failed with ``EIO``): it is visible now
    and may be gone after a crash. Raised for a manifest, the commit's outcome is unknown:
    the save fails, and every rank keeps its files."""


class FileSink(abc.ABC):
    """A file being written, front to back.

    ``keeps_buffers`` says whether :meth:`write` may still use the buffers it
    was given after it returns (to upload them later, say); a sink that is
    done with them sets it to False, and callers may then refill them.
    """

    keeps_buffers: bool = True

    @abc.abstractmethod
    def write(self, buffers: Sequence[Buffer]) -> None:
        """Append ``buffers`` in order (gathered into one call where possible)."""

    def copy_from(self, path: str, length: int) -> bool:
        """Append the first ``length`` bytes of the local file ``path`` without
        passing them through Python, if this sink can (in the kernel, say):
        True when done, False when it cannot (nothing was written; the caller
        writes the bytes itself)."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the file and make it durable (on stores that sync)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Give up on the file; remove what was written if possible. Also called after a
        :meth:`close` that raised: then release nothing a second time."""


class PendingUpload(NamedTuple):
    """An upload begun under a location and neither completed nor aborted (an S3
    multipart upload): ``name`` relative to the location, the store's ``upload_id``,
    and when it ``started`` (seconds since the epoch)."""

    name: str
    upload_id: str
    started: float


class ByteStore(abc.ABC):
    """Named files under one checkpoint location.

    ``location`` is how errors name the place (a path or URI).
    ``read_segment_bytes`` is how much one read should cover (a
    :meth:`read_into` call, a piece of :meth:`read_in_order`): small for local
    stores (the bytes are verified while still in cache), large for remote ones
    (a call can then issue several big ranged requests at once).

    Errors: a missing file is a ``FileNotFoundError``; a store that runs out
    of room raises :class:`StorageFullError`; a publish that put its file in
    place but could not make it durable raises :class:`NotDurableError`; other
    failures of the medium are best raised as :class:`StorageIOError` naming the
    file and the cause.
    """

    location: str
    read_segment_bytes: int = 1 << 20

    def local_path(self, name: str) -> str | None:
        """The path of file ``name`` in this machine's filesystem, for stores whose
        files are local ones (then it can be mapped); None (the default) otherwise."""
        return None

    def adopt(self, other: ByteStore, name: str) -> bool:
        """Make file ``name`` of ``other`` (another location of this kind of store)
        a file of this location too, without copying its bytes, so that it stays
        whatever happens to ``other``. True if done (or already so); False (the
        default) where this store cannot, and incremental saves are refused."""
        return False

    def can_adopt(self) -> bool:
        """Whether :meth:`adopt` can ever succeed here (incremental saves need it): by
        default, whether this store's class overrides it."""
        return type(self).adopt is not ByteStore.adopt

    def ensure_capacity(self, nbytes: int) -> None:  # noqa: B027 (optional hook)
        """Raise :class:`StorageFullError` if ``nbytes`` more bytes cannot fit.

        Called once per rank before a save writes anything, with the bytes
        that rank is about to write, so a save that cannot fit fails before
        filling the store. Stores without a notion of free space keep the
        default, which accepts anything.
        """

    @abc.abstractmethod
    def prepare(self) -> None:
        """Make the location ready for writing (create directories...). Idempotent."""

    @abc.abstractmethod
    def create(self, name: str) -> FileSink:
        """Start writing a new file ``name`` (never an existing one)."""

    @abc.abstractmethod
    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, buffer)`` with the file's bytes at ``offset``.

        A file shorter than a request raises CorruptCheckpointError; a missing
        one raises FileNotFoundError.
        """

    def read_in_order(
        self, name: str, requests: Sequence[tuple[int, memoryview]], landed: Callable[[int], None]
    ) -> None:
        """Fill each ``(offset, buffer)`` of ``requests`` (in file order), calling
        ``landed(i)`` once request ``i`` holds its bytes, in order; errors as :meth:`read_into`.

        The layout reader verifies each request in ``landed``. By default, runs of
        about ``read_segment_bytes`` are read with :meth:`read_into`, then reported;
        a store that reads piece by piece at little cost per call (a local file kept
        open) reports each piece as it lands, while its bytes are in the core's cache.
        """
        run: list[tuple[int, memoryview]] = []
        first = size = 0
        for i, request in enumerate(requests):
            run.append(request)
            size += len(request[1])
            if size >= self.read_segment_bytes or i == len(requests) - 1:
                self.read_into(name, run)
                for j in range(first, i + 1):
                    landed(j)
                run = []
                first = i + 1
                size = 0

    @abc.abstractmethod
    def read_file(self, name: str) -> bytes:
        """The whole file ``name``; FileNotFoundError if it is missing."""

    def read_small_file(self, name: str, limit: int) -> bytes | None:
        """The whole file ``name``, or None when it holds more than ``limit`` bytes, told
        before reading them; FileNotFoundError if it is missing. Manifests and other small
        files are read so (:func:`read_capped`, which refuses a file that came back longer
        all the same), a huge or sparse one never read.

        By default the size comes from :meth:`file_sizes` (or, where that cannot tell, a
        one-byte :meth:`read_into` at offset ``limit``), then :meth:`read_file` reads it.
        A store that can tell one file's size at little cost (a ``stat``), or in the request
        that reads it (an HTTP ``Content-Length``), overrides it."""
        return read_bounded(self, name, limit)

    def file_sizes(self) -> dict[str, int] | None:
        """Sizes in bytes of the regular files at the location, by name, or None
        where the store cannot tell cheaply (then reads find truncation as they go).

        Readers check every location in a manifest against these sizes before
        allocating anything for it.
        """
        return None

    def file_times(self) -> dict[str, float] | None:
        """When each file at the location last changed (seconds since the epoch), by name,
        for :func:`torchstow.gc`'s grace period; None where the store cannot tell (gc then
        removes nothing there). This default serves stores with :meth:`local_path`: a
        file's newer of modification and status change (a new hard link changes the latter)."""
        times = {}
        for name in self.list_files():
            path = self.local_path(name)
            if path is None:
                return None
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            times[name] = max(st.st_mtime, st.st_ctime)
        return times

    def pending_uploads(self) -> list[PendingUpload]:
        """The uploads begun under the location, at any depth, and neither completed
        nor aborted; [] (the default) for stores without such a thing."""
        return []

    def abort_upload(self, upload: PendingUpload) -> None:
        """Abort one of :meth:`pending_uploads` (one already gone is fine)."""
        raise NotImplementedError(f"{type(self).__name__} has no pending uploads to abort")

    @abc.abstractmethod
    def publish(self, name: str, data: bytes) -> None:
        """Write ``data`` as ``name`` atomically: readers see the old file or the new, whole."""

    def publish_new(self, name: str, data: bytes) -> None:
        """:meth:`publish`, but only if ``name`` does not exist yet: FileExistsError if it does.

        Of two concurrent calls exactly one may succeed. This default checks,
        then publishes, which is *not* exclusive: a store with an exclusive
        create (a hard link, a conditional PUT) overrides it.
        """
        if name in self.list_files():
            raise FileExistsError(f"{self.location}/{name} exists")
        self.publish(name, data)

    @abc.abstractmethod
    def list_files(self) -> list[str]:
        """Names of the files at the location ([] when it does not exist)."""

    @abc.abstractmethod
    def delete_files(self, names: Sequence[str]) -> None:
        """Remove files; names that do not exist are ignored."""

    @abc.abstractmethod
    def remove_location(self) -> None:
        """Remove the (now empty) location itself, where that means anything."""


def read_bounded(
    store: ByteStore, name: str, limit: int, sizes_from: ByteStore | None = None
) -> bytes | None:
    """:meth:`ByteStore.read_small_file`'s default: ``store.read_file(name)`` unless the
    file holds more than ``limit`` bytes, told first by ``sizes_from`` (default ``store``:
    its :meth:`~ByteStore.file_sizes`, else a read of the byte at offset ``limit``, which
    a store raises CorruptCheckpointError for where the file ends before it; a store whose
    read fails otherwise there has the file read whole, as before this check)."""
    sizes_from = store if sizes_from is None else sizes_from
    sizes = sizes_from.file_sizes()
    if sizes is not None:
        if sizes.get(name, 0) > limit:  # one not listed: read_file says it is missing
            return None
    else:
        try:
            sizes_from.read_into(name, [(limit, memoryview(bytearray(1)))])
        except FileNotFoundError:
            raise
        except CorruptCheckpointError:
            pass  # it ends before byte ``limit``
        except Exception:  # a store that cannot read there: the file is read whole, as before
            logger.debug("no size of %s/%s from a read at %d", store.location, name, limit, exc_info=True)
        else:
            return None
    return store.read_file(name)


def read_capped(store: ByteStore, name: str, limit: int) -> bytes:
    """The whole file ``name`` of ``store``; CorruptCheckpointError, without reading it
    where the store can tell its size, when it holds more than ``limit`` bytes (a damaged
    or hostile manifest must not take the process's memory); FileNotFoundError if missing."""
    data = store.read_small_file(name, limit)
    if data is None or len(data) > limit:
        raise too_large(f"{store.location}/{name}", limit)
    return data
