"""What lies under a prefix: committed checkpoints, and with ``all`` the incomplete and unreadable ones."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
)
from torchstow.format.manifest import CheckpointInfo
from torchstow.management.steps import step_of
from torchstow.plugins.manager import default_registry

__all__ = ["Entry", "scan"]

COMMITTED = "committed"
INCOMPLETE = "incomplete"
UNREADABLE = "unreadable"


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


def scan(prefix: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> list[Entry]:
    """Every checkpoint location directly under ``prefix``, ordered as :func:`torchstow.list_checkpoints`
    orders committed ones (by step, then commit time). Raises :class:`CheckpointNotFoundError`
    when nothing at all is under ``prefix``."""
    from torchstow.interop.dcp_format import read_any_metadata
    from torchstow.interop.sources import is_dcp
    from torchstow.management.catalog import checkpoint_info as _info

    text = os.fspath(prefix)
    backend = default_registry().backend_for(text, storage_options)
    children = backend.list_children(text)
    if not children:
        raise CheckpointNotFoundError(f"nothing under {text}: it does not exist or is empty")
    entries = []
    for child in children:
        try:
            info = _info(child, read_any_metadata(backend, child))
        except IncompleteCheckpointError as exc:
            entries.append(Entry(child, INCOMPLETE, step_of(child), error=str(exc)))
        except (CorruptCheckpointError, FormatVersionError) as exc:
            entries.append(Entry(child, UNREADABLE, step_of(child), error=str(exc)))
        except CheckpointNotFoundError:
            continue  # not a checkpoint
        else:
            dcp = isinstance(backend, StoreBackend) and is_dcp(backend.open_store(child).list_files())
            entries.append(Entry(child, COMMITTED, info.step, info, format="dcp" if dcp else "torchstow"))
    entries.sort(
        key=lambda e: (-1 if e.step is None else e.step, (e.info.committed_at if e.info else None) or 0.0)
    )
    return entries
