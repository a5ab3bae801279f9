"""What the layout writer and reader share: a location's committed manifest, rebinding to
another location, and how many threads move bytes."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

from torchstow.core.storage.store import ByteStore, read_capped
from torchstow.errors import CheckpointExistsError, CheckpointNotFoundError, IncompleteCheckpointError
from torchstow.format.codec import decode_metadata
from torchstow.format.dcp_metadata import decode_dcp_metadata
from torchstow.format.files import DCP_METADATA, MANIFEST, MANIFEST_MAX_BYTES, is_checkpoint_file
from torchstow.format.manifest import Metadata
from torchstow.format.validation import check_extents

__all__ = [
    "StoreOpener",
    "check_vacant",
    "dcp_files",
    "decode_manifest",
    "default_thread_count",
    "manifest_bytes",
    "read_dcp_manifest",
    "read_dcp_metadata",
    "read_manifest",
    "rebind",
    "stray_dcp_files",
]

StoreOpener = Callable[[str], ByteStore]


def default_thread_count() -> int:
    """Threads per rank for moving bytes: the cores there are, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def read_manifest(store: ByteStore, *, dcp: bool = False) -> Metadata:
    """The committed manifest of ``store``'s checkpoint; with ``dcp``, where there is
    none but a DCP ``.metadata`` (a checkpoint of stock ``dcp.save``), that one read as
    a torchstow manifest (its locations checked against the file sizes).

    Raises CheckpointNotFoundError when nothing is there (or a file is) and
    IncompleteCheckpointError when data exists without a manifest (with ``dcp``, DCP's
    ``.distcp`` files without its ``.metadata`` too).
    """
    try:
        data = manifest_bytes(store)
    except NotADirectoryError:  # a local location that is a file (/dev/null, model.txt)
        raise CheckpointNotFoundError(
            f"no checkpoint at {store.location}: it is a file, or lies under one"
        ) from None
    except FileNotFoundError:
        names = store.list_files()
        if dcp and DCP_METADATA in names:
            return read_dcp_manifest(store)
        if dcp and stray_dcp_files(names):
            raise IncompleteCheckpointError(
                f"{store.location} holds DCP's data files (*.distcp) but no {DCP_METADATA}: a DCP save "
                "that did not finish (or is still running), or a deletion that was interrupted. "
                "Save again, or delete the location (torchstow rm)."
            ) from None
        if any(is_checkpoint_file(name) for name in names):
            raise IncompleteCheckpointError(
                f"{store.location} holds checkpoint data but no committed {MANIFEST}: the save "
                "that wrote it did not finish. Save again, or delete the location."
            ) from None
        raise CheckpointNotFoundError(f"no checkpoint at {store.location}") from None
    return decode_manifest(store, data)


def manifest_bytes(store: ByteStore, name: str = MANIFEST) -> bytes:
    """The bytes of ``store``'s manifest (``name``: torchstow's, or DCP's ``.metadata``),
    FileNotFoundError when there is none; CorruptCheckpointError, without reading it where
    the store can tell its size, when it holds more than
    :data:`~torchstow.format.files.MANIFEST_MAX_BYTES`."""
    return read_capped(store, name, MANIFEST_MAX_BYTES)


def decode_manifest(store: ByteStore, data: bytes) -> Metadata:
    """``data``, the manifest of ``store``, decoded: its chunk table (version 2) read from
    ``store``, refused unread when it holds more bytes than the manifest records."""
    return decode_metadata(data, source=f"{store.location}/{MANIFEST}", read_file=partial(read_capped, store))


def read_dcp_metadata(store: ByteStore) -> Metadata:
    """The DCP ``.metadata`` of ``store``'s checkpoint, decoded as a torchstow manifest
    (FileNotFoundError when there is none), read as :func:`manifest_bytes` reads it."""
    return decode_dcp_metadata(manifest_bytes(store, DCP_METADATA), source=f"{store.location}/{DCP_METADATA}")


def read_dcp_manifest(store: ByteStore) -> Metadata:
    """The DCP ``.metadata`` of ``store``'s checkpoint as a torchstow manifest, its
    locations checked against the sizes of the files present (before anything is
    allocated for them); CheckpointNotFoundError when there is none."""
    try:
        metadata = read_dcp_metadata(store)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint at {store.location}") from None
    sizes = store.file_sizes()
    if sizes is not None:
        check_extents(metadata.storage_data.items(), sizes, store.location)
    return metadata


def check_vacant(
    store: ByteStore, replacing: str = "the old one stays valid until the new one commits"
) -> None:
    """Raise CheckpointExistsError when ``store``'s location holds a committed checkpoint:
    a torchstow manifest, or the ``.metadata`` of one in DCP's own format. ``replacing``
    says what an overwrite would do to it (a torchstow save keeps the old one valid)."""
    files = store.list_files()
    kind = (
        "a checkpoint" if MANIFEST in files else "a DCP-format checkpoint" if DCP_METADATA in files else None
    )
    if kind is not None:
        raise CheckpointExistsError(
            f"{kind} already exists at {store.location}; pass overwrite=True (--overwrite) to replace it "
            f"({replacing})"
        )


def dcp_files(names: Collection[str], *, stray: bool = False) -> list[str]:
    """The files of a checkpoint in DCP's own format among ``names``, in the order to delete
    them: its ``.metadata`` first (so it is never half valid), then its ``.distcp`` data
    files; [] when there is no ``.metadata`` (with ``stray``, its ``.distcp`` files all the same)."""
    if DCP_METADATA not in names:
        return sorted(name for name in names if name.endswith(".distcp")) if stray else []
    return [DCP_METADATA, *sorted(name for name in names if name.endswith(".distcp"))]


def stray_dcp_files(names: Collection[str]) -> list[str]:
    """DCP's data files (``*.distcp``) among ``names`` where there is neither DCP's
    ``.metadata`` nor a torchstow manifest: what a DCP save that died (or is still
    running) or an interrupted deletion (``.metadata`` goes first) leaves; sorted."""
    if DCP_METADATA in names or MANIFEST in names:
        return []
    return dcp_files(names, stray=True)


def rebind(store: ByteStore, opener: StoreOpener | None, checkpoint_id: Any) -> ByteStore:
    """``store``, or the store ``opener`` gives for ``checkpoint_id`` when that names another location."""
    if checkpoint_id is None or str(checkpoint_id) == store.location:
        return store
    if opener is None:
        raise ValueError(
            f"this storage object is bound to {store.location}; create a new one for {checkpoint_id}"
        )
    return opener(str(checkpoint_id))
