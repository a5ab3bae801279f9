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

Each checkpoint thus holds, under its own location, every file it references:
it loads, verifies and copies on its own, and deleting or pruning any other
checkpoint (its base included) removes only names, never bytes it uses
(the filesystem frees a file's bytes when its last link goes). Stores that
cannot link files (object stores) refuse ``base=`` with a ValueError.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import blake3

from torchstow.core.storage.store import ByteStore
from torchstow.errors import CorruptCheckpointError
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo

__all__ = ["BaseContent", "content_hash"]

_HASH_SEGMENT = 8 << 20


def content_hash(view: memoryview) -> str:
    """The BLAKE3 digest (hex) of ``view``; the GIL is released for large inputs."""
    hasher = blake3.blake3(max_threads=1)
    hasher.update(view if view.format == "B" else view.cast("B"))
    return hasher.hexdigest()


class BaseContent:
    """The committed checkpoint an incremental save compares against.

    ``store`` holds the base's files, ``metadata`` is its manifest. Safe to
    use from the writer's threads.
    """

    def __init__(self, store: ByteStore, metadata: Metadata) -> None:
        locations = metadata.storage_data
        self.store = store
        self.locations: dict[MetadataIndex, StorageInfo] = locations if isinstance(locations, dict) else {}
        self._lock = threading.Lock()
        self._adopted: dict[str, bool] = {}
        self._present: set[str] | None = None
        self._hashes: dict[MetadataIndex, str] = {}
        #: Files this save made part of its location (to remove if the save fails).
        self.adopted: list[str] = []

    def reference(
        self, index: MetadataIndex, view: memoryview, target: ByteStore
    ) -> tuple[StorageInfo | None, str]:
        """The digest of ``view``, and where the base already holds these bytes (its file
        now part of ``target``), or None when the item must be written."""
        digest = content_hash(view)
        return self.reference_digest(index, len(view), digest, target), digest

    def reference_digest(
        self, index: MetadataIndex, length: int, digest: str, target: ByteStore
    ) -> StorageInfo | None:
        """Where the base already holds ``length`` bytes of digest ``digest`` under
        ``index`` (its file now part of ``target``), or None."""
        info = self.locations.get(index)
        if info is None or info.length != length or not info.length:
            return None
        if self._base_hash(index, info) != digest or not self._adopt(info.relative_path, target):
            return None
        return StorageInfo(
            info.relative_path, info.offset, info.length, info.checksums, info.block_size, digest
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
