"""What lies under a prefix: committed checkpoints, and with ``all`` the incomplete and unreadable ones.

The one walk over a prefix's children (:func:`entries`) under both
:func:`scan` (``torchstow ls``) and :func:`torchstow.list_checkpoints`, with
one error policy for each child: no checkpoint there, not an entry; a save
that never committed, ``incomplete``; a manifest that does not decode (or is
of a newer format) or a child that cannot be read (permission denied, a
permanent storage error), ``unreadable`` with the error; a transient storage
error (:class:`~torchstow.errors.StorageIOError` with ``transient``) raises,
since the store is failing, not the checkpoint, and an older checkpoint must
not pass for the newest. To :func:`children_of` (``list_checkpoints``) a
prefix that does not exist has no children; :func:`scan` says so, naming it.
A child that is a symbolic link is listed as what it links to; :func:`is_link` tells
it, for what deletes (``prune``, ``gc``), which never goes through one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.core.storage.store import ByteStore
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
    StorageIOError,
)
from torchstow.format.manifest import CheckpointInfo, Metadata, stored_nbytes
from torchstow.interop.sources import checkpoint_file_note, file_in_the_way, local_folder
from torchstow.management.steps import step_of
from torchstow.management.verify import ProgressCallback
from torchstow.plugins.resolve import backend_at

__all__ = [
    "Entry",
    "IsACheckpointError",
    "checkpoint_info",
    "children_of",
    "entries",
    "file_in_the_way",
    "is_link",
    "link_target",
    "scan",
    "what_file",
]

COMMITTED = "committed"
INCOMPLETE = "incomplete"
UNREADABLE = "unreadable"


class IsACheckpointError(CheckpointNotFoundError):
    """The prefix given to :func:`scan` is a checkpoint itself, not a prefix of checkpoints."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(
            f"{entry.uri} is a checkpoint, not a prefix of checkpoints: "
            f"give its parent, or see it with 'torchstow info {entry.uri}'"
        )
        self.entry = entry


@dataclass(frozen=True)
class Entry:
    """One checkpoint location under a prefix: its status, and its summary when committed,
    and its format (``torchstow`` or ``dcp``) where :func:`scan` found it."""

    uri: str
    status: str
    step: int | None
    info: CheckpointInfo | None = None
    error: str | None = None
    format: str | None = None


def checkpoint_info(uri: str, metadata: Metadata) -> CheckpointInfo:
    """The summary of the checkpoint at ``uri`` whose manifest is ``metadata``."""
    nbytes = stored_nbytes(metadata)
    return CheckpointInfo(
        uri=uri,
        step=step_of(uri, metadata.user_metadata),
        committed_at=metadata.committed_at,
        nbytes=nbytes,
        nbytes_written=nbytes if metadata.nbytes_written is None else metadata.nbytes_written,
        num_entries=len(metadata.state_dict_metadata),
        user_metadata=metadata.user_metadata,
        format_version=metadata.version,
        save_seconds=metadata.save_seconds,
    )


def _entry(backend: Backend, uri: str) -> Entry | None:
    """The checkpoint location ``uri``, or None when it is not one (the module's error policy)."""

    try:
        info = checkpoint_info(uri, backend.read_metadata(uri))
    except IncompleteCheckpointError as exc:
        return Entry(uri, INCOMPLETE, step_of(uri), error=str(exc))
    except (CorruptCheckpointError, FormatVersionError) as exc:
        return Entry(uri, UNREADABLE, step_of(uri), error=str(exc))
    except CheckpointNotFoundError:
        return None
    except OSError as exc:
        if isinstance(exc, StorageIOError) and exc.transient:
            raise  # the store is failing, not this checkpoint
        return Entry(uri, UNREADABLE, step_of(uri), error=f"it cannot be read: {exc}")
    return Entry(uri, COMMITTED, info.step, info)


def _with_format(backend: Backend, entry: Entry) -> Entry:
    """``entry`` with its format, when committed (one more listing of its location)."""
    from torchstow.interop.sources import is_dcp

    if entry.status != COMMITTED:
        return entry
    dcp = isinstance(backend, StoreBackend) and is_dcp(backend.open_store(entry.uri).list_files())
    return replace(entry, format="dcp" if dcp else "torchstow")


def scan(
    prefix: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> list[Entry]:
    """Every checkpoint location directly under ``prefix``, ordered as :func:`torchstow.list_checkpoints`
    orders committed ones (by step, then commit time). Raises :class:`CheckpointNotFoundError`
    when nothing at all is under ``prefix``, and :class:`IsACheckpointError` when ``prefix``
    is itself a checkpoint (its entry in ``entry``). ``progress(1, number_of_children)``
    is called after each child is looked at."""
    text, backend = backend_at(prefix, storage_options)
    children = backend.list_children(text)  # a missing bucket is an error here, naming it
    if not children:
        itself = _entry(backend, text)
        if itself is not None and itself.status == COMMITTED:
            raise IsACheckpointError(_with_format(backend, itself))
        blocker = file_in_the_way(backend, text)
        if blocker is not None:
            raise CheckpointNotFoundError(f"nothing under {text}: {what_file(blocker)}")
        raise CheckpointNotFoundError(f"nothing under {text}: it does not exist or is empty")
    return [_with_format(backend, entry) for entry in entries(backend, children, progress)]


def children_of(backend: Backend, prefix: str) -> list[str]:
    """The locations directly under ``prefix``; none when it does not exist (a missing bucket)."""
    try:
        return backend.list_children(prefix)
    except CheckpointNotFoundError:
        return []


def what_file(blocker: str) -> str:
    """What the local file ``blocker``, in the way of a checkpoint or a prefix, is (a
    checkpoint's manifest: the checkpoint is its folder)."""
    return checkpoint_file_note(blocker) or f"{blocker} is a file, not a directory"


def is_link(backend: Backend, uri: str) -> bool:
    """Whether the location ``uri`` is a symbolic link (a local store's directory)."""
    return isinstance(backend, StoreBackend) and link_target(backend.open_store(uri)) is not None


def link_target(store: ByteStore) -> str | None:
    """Where ``store``'s location leads when it is a symbolic link (a local directory),
    resolved; else None."""
    folder = local_folder(store)
    if folder is None or not os.path.islink(folder):
        return None
    return os.path.realpath(folder)


def entries(backend: Backend, children: list[str], progress: ProgressCallback | None = None) -> list[Entry]:
    """The checkpoint locations among ``children`` (see the module's error policy), ordered
    by step (none first), then by commit time; ``progress(1, len(children))`` after each."""
    found = []
    for child in children:
        entry = _entry(backend, child)
        if entry is not None:
            found.append(entry)
        if progress is not None:
            progress(1, len(children))
    found.sort(
        key=lambda e: (-1 if e.step is None else e.step, (e.info.committed_at if e.info else None) or 0.0)
    )
    return found
