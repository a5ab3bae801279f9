"""What lies under a prefix: committed checkpoints, and with ``all`` the incomplete and unreadable ones."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
)
from torchstow.format.manifest import CheckpointInfo
from torchstow.management.catalog import checkpoint_info
from torchstow.management.steps import step_of
from torchstow.plugins.resolve import backend_at

__all__ = ["Entry", "IsACheckpointError", "scan"]

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
    """One checkpoint location under a prefix: its status, and its summary and format
    (``torchstow`` or ``dcp``) when committed."""

    uri: str
    status: str
    step: int | None
    info: CheckpointInfo | None = None
    error: str | None = None
    format: str | None = None


def _entry(backend: Backend, uri: str) -> Entry | None:
    """The checkpoint location ``uri``, or None when it is not one."""
    from torchstow.interop.sources import is_dcp

    try:
        info = checkpoint_info(uri, backend.read_metadata(uri))
    except IncompleteCheckpointError as exc:
        return Entry(uri, INCOMPLETE, step_of(uri), error=str(exc))
    except (CorruptCheckpointError, FormatVersionError) as exc:
        return Entry(uri, UNREADABLE, step_of(uri), error=str(exc))
    except CheckpointNotFoundError:
        return None
    dcp = isinstance(backend, StoreBackend) and is_dcp(backend.open_store(uri).list_files())
    return Entry(uri, COMMITTED, info.step, info, format="dcp" if dcp else "torchstow")


def scan(prefix: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> list[Entry]:
    """Every checkpoint location directly under ``prefix``, ordered as :func:`torchstow.list_checkpoints`
    orders committed ones (by step, then commit time). Raises :class:`CheckpointNotFoundError`
    when nothing at all is under ``prefix``, and :class:`IsACheckpointError` when ``prefix``
    is itself a checkpoint (its entry in ``entry``)."""
    text, backend = backend_at(prefix, storage_options)
    children = backend.list_children(text)
    if not children:
        itself = _entry(backend, text)
        if itself is not None and itself.status == COMMITTED:
            raise IsACheckpointError(itself)
        raise CheckpointNotFoundError(f"nothing under {text}: it does not exist or is empty")
    entries = [e for e in (_entry(backend, child) for child in children) if e is not None]
    entries.sort(
        key=lambda e: (-1 if e.step is None else e.step, (e.info.committed_at if e.info else None) or 0.0)
    )
    return entries
