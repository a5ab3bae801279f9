"""Incremental saves: write only the tensors whose bytes changed since a base checkpoint.

``save(sd, uri, base=previous)`` hashes every tensor item with BLAKE3 as the
writer reaches it. An item whose digest equals the digest of the item with
the same key and chunk in ``previous`` (and the same length) is not written:
the data file holding it in ``previous`` becomes a file of the new checkpoint
too (a hard link: no byte is copied), and the new manifest points into it.
Every other item is written as usual, with its digest recorded next to its
crc32c, so the next incremental save can compare against it without reading.
A base saved without digests (a plain save) has the items in question hashed
from its files once. With ``trust_version_counter=True`` a tensor item hashed
by an earlier such save in this process, unchanged since by its version
counter, takes its digest from :mod:`torchstow.core.layout.digest_memo`
instead: its bytes are not read unless they must be written.

Digests are of the stored bytes: with ``compression=`` an item is compressed
first, and shared only with a base item stored the same way (same codec, same
bytes), whose location, codec included, the new manifest takes over.

Each checkpoint thus holds, under its own location, every file it references:
it loads, verifies and copies on its own, and deleting or pruning any other
checkpoint (its base included) removes only names, never bytes it uses
(the filesystem frees a file's bytes when its last link goes). Stores that
cannot link files (object stores) refuse ``base=`` with a ValueError.

A base file is linked only while it is a regular file (no symbolic link) at
least as long as the base's manifest says it is; a truncated or replaced
file is not trusted: the items it held are written again (and a warning
logged). :func:`base_problem` is the check a caller that chooses bases
itself (``CheckpointManager``) runs first.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import blake3

from torchstow.core.layout.location import read_manifest
from torchstow.core.storage.store import ByteStore
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
)
from torchstow.format.files import DCP_METADATA
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo
from torchstow.format.validation import check_extents

__all__ = ["BaseContent", "base_problem", "content_hash"]

logger = logging.getLogger(__name__)

_HASH_SEGMENT = 8 << 20


def content_hash(view: memoryview) -> str:
    """The BLAKE3 digest (hex) of ``view``; the GIL is released for large inputs."""
    hasher = blake3.blake3(max_threads=1)
    hasher.update(view if view.format == "B" else view.cast("B"))
    return hasher.hexdigest()


def base_problem(store: ByteStore) -> str | None:
    """Why the checkpoint in ``store`` cannot be an incremental save's base, or None when it can:
    it must be a committed torchstow checkpoint (not DCP's format, not incomplete, its manifest
    readable) whose data files are all there, as long as its manifest says."""
    try:
        metadata = read_manifest(store)
    except CheckpointNotFoundError as exc:
        if DCP_METADATA in store.list_files():
            return f"{store.location} is a DCP-format checkpoint, not a torchstow one"
        return str(exc)
    except (IncompleteCheckpointError, CorruptCheckpointError, FormatVersionError) as exc:
        return str(exc)
    sizes = store.file_sizes()
    if sizes is None or not isinstance(metadata.storage_data, Mapping):
        return None
    try:
        missing = check_extents(metadata.storage_data.items(), sizes, store.location)
    except CorruptCheckpointError as exc:
        return str(exc)
    if missing:
        return f"{store.location}/{min(missing)} is missing, though its manifest lists it"
    return None


class BaseContent:
    """The committed checkpoint an incremental save compares against.

    ``store`` holds the base's files, ``metadata`` is its manifest. Safe to
    use from the writer's threads.
    """

    def __init__(self, store: ByteStore, metadata: Metadata) -> None:
        locations = metadata.storage_data
        self.store = store
        self.locations: Mapping[MetadataIndex, StorageInfo] = (
            locations if isinstance(locations, Mapping) else {}
        )
        self._lock = threading.Lock()
        self._adopted: dict[str, bool] = {}
        self._present: set[str] | None = None
        self._hashes: dict[MetadataIndex, str] = {}
        self._extents: dict[str, int] = {}
        for info in self.locations.values():
            end = info.offset + info.length
            if end > self._extents.get(info.relative_path, 0):
                self._extents[info.relative_path] = end
        self._sizes: dict[str, int] | None = None
        self._listed = False
        self._usable: dict[str, bool] = {}
        #: Files this save made part of its location (to remove if the save fails).
        self.adopted: list[str] = []

    def reference(
        self, index: MetadataIndex, view: memoryview, target: ByteStore, codec: str | None = None
    ) -> tuple[StorageInfo | None, str]:
        """The digest of ``view`` (an item's stored bytes, in ``codec``), and where the base
        already holds these bytes so stored (its file now part of ``target``), or None when
        the item must be written."""
        digest = content_hash(view)
        info = self.locations.get(index)
        if info is None or info.codec != codec:
            return None, digest
        return self.reference_digest(index, len(view), digest, target), digest

    def reference_digest(
        self, index: MetadataIndex, length: int | None, digest: str, target: ByteStore
    ) -> StorageInfo | None:
        """Where the base already holds ``length`` stored bytes (None: any length) of
        digest ``digest`` under ``index`` (its file now part of ``target``), or None.
        The location keeps the base's codec: the digest is of the stored bytes."""
        info = self.locations.get(index)
        if info is None or not info.length or (length is not None and info.length != length):
            return None
        if not self._intact(info.relative_path):
            return None
        if self._base_hash(index, info) != digest or not self._adopt(info.relative_path, target):
            return None
        return StorageInfo(
            info.relative_path,
            info.offset,
            info.length,
            info.checksums,
            info.block_size,
            digest,
            info.codec,
        )

    def _base_hash(self, index: MetadataIndex, info: StorageInfo) -> str:
        """The base item's digest: recorded, or computed once from its file."""
        if info.content_hash is not None:
            return info.content_hash
        found = self._hashes.get(index)
        if found is None:
            hasher = blake3.blake3(max_threads=1)
            buffer = memoryview(bytearray(min(info.length, _HASH_SEGMENT)))
            for pos in range(0, info.length, _HASH_SEGMENT):
                piece = buffer[: min(_HASH_SEGMENT, info.length - pos)]
                try:
                    self.store.read_into(info.relative_path, [(info.offset + pos, piece)])
                except FileNotFoundError as exc:
                    raise CorruptCheckpointError(
                        f"the base checkpoint {self.store.location} lacks {info.relative_path}"
                    ) from exc
                hasher.update(piece)
            found = self._hashes[index] = hasher.hexdigest()
        return found

    def _intact(self, name: str) -> bool:
        """Whether the base's file ``name`` is still a regular file (not a symbolic link) holding
        every item the base's manifest places in it; checked once per file, before it is trusted."""
        with self._lock:
            found = self._usable.get(name)
            if found is None:
                if not self._listed:
                    self._sizes, self._listed = self.store.file_sizes(), True
                if self._sizes is None:
                    return True  # a store that cannot tell sizes: the reads will
                size = self._sizes.get(name)
                found = self._usable[name] = size is not None and size >= self._extents.get(name, 0)
                if not found:
                    logger.warning(
                        "the base file %s/%s is %s, not the regular file of at least %d bytes its manifest "
                        "records: the items it held are written again instead of shared",
                        self.store.location,
                        name,
                        "missing or not a regular file" if size is None else f"{size} bytes",
                        self._extents.get(name, 0),
                    )
            return found

    def _adopt(self, name: str, target: ByteStore) -> bool:
        with self._lock:
            done = self._adopted.get(name)
            if done is None:
                if self._present is None:
                    self._present = set(target.list_files())
                done = self._adopted[name] = target.adopt(self.store, name)
                if done and name not in self._present:
                    self.adopted.append(name)
            return done


BaseLoader = Callable[[], BaseContent]
