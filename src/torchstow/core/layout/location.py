"""What the layout writer and reader share: a location's committed manifest, rebinding to
another location, and how many threads move bytes."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torchstow.core.storage.store import ByteStore
from torchstow.errors import CheckpointNotFoundError, IncompleteCheckpointError
from torchstow.format.codec import decode_metadata
from torchstow.format.files import MANIFEST, is_checkpoint_file
from torchstow.format.manifest import Metadata

__all__ = ["StoreOpener", "default_thread_count", "read_manifest", "rebind"]

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


def rebind(store: ByteStore, opener: StoreOpener | None, checkpoint_id: Any) -> ByteStore:
    """``store``, or the store ``opener`` gives for ``checkpoint_id`` when that names another location."""
    if checkpoint_id is None or str(checkpoint_id) == store.location:
        return store
    if opener is None:
        raise ValueError(
            f"this storage object is bound to {store.location}; create a new one for {checkpoint_id}"
        )
    return opener(str(checkpoint_id))
