"""The checkpoints under a prefix, by their manifests: info, listing, latest, delete.

These read manifests only (torchstow's or DCP's ``.metadata``), never data
files, except :func:`latest` with ``verified=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torchstow.core.layout.location import dcp_files, read_manifest
from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
    StorageIOError,
)
from torchstow.format.dcp_metadata import decode_dcp_metadata
from torchstow.format.files import DCP_METADATA, MANIFEST
from torchstow.format.manifest import CheckpointInfo, Metadata, stored_nbytes
from torchstow.management.steps import step_of
from torchstow.management.verify import verify
from torchstow.plugins.resolve import Uri, backend_at

__all__ = ["checkpoint_info", "delete", "info", "latest", "list_checkpoints"]

logger = logging.getLogger(__name__)


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
    )


def info(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """A summary of the checkpoint at ``uri`` from its manifest (no data files read)."""
    text, backend = backend_at(uri, storage_options)
    return checkpoint_info(text, backend.read_metadata(text))


def list_checkpoints(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> list[CheckpointInfo]:
    """The committed checkpoints directly under ``uri`` (a directory or prefix), oldest first.

    Ordered by step (see :func:`torchstow.management.steps.step_of`; none first),
    then by commit time. Incomplete and unreadable checkpoints are skipped.
    """
    text, backend = backend_at(uri, storage_options)
    try:
        children = backend.list_children(text)
    except CheckpointNotFoundError:  # a bucket that does not exist (yet): nothing committed there
        return []
    found = []
    for child in children:
        try:
            found.append(checkpoint_info(child, backend.read_metadata(child)))
        except (CheckpointNotFoundError, IncompleteCheckpointError):
            continue
        except (CorruptCheckpointError, FormatVersionError) as exc:
            logger.warning("skipping %s: %s", child, exc)
        except OSError as exc:
            if isinstance(exc, StorageIOError) and exc.transient:
                raise  # the store is failing, not this checkpoint: an older one must not win
            logger.warning("skipping %s, which cannot be read: %s", child, exc)
    found.sort(key=lambda i: (-1 if i.step is None else i.step, i.committed_at or 0.0))
    return found


def latest(uri: Uri, *, storage_options: dict[str, Any] | None = None, verified: bool = False) -> str | None:
    """The URI of the newest committed checkpoint under ``uri`` (a directory or prefix), or None.

    With ``verified=True``, the newest one whose every byte passes
    :func:`torchstow.verify` (older ones are tried in turn).
    """
    found = list_checkpoints(uri, storage_options=storage_options)
    if not verified:
        return found[-1].uri if found else None
    for candidate in reversed(found):
        report = verify(candidate.uri, storage_options=storage_options)
        if report.ok:
            return candidate.uri
        logger.warning("skipping %s: %s", candidate.uri, report.problems[0])
    return None


def delete(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the checkpoint at ``uri``, manifest first, so it is never half valid.

    A torchstow checkpoint (committed, or the data of a save that never
    committed), or one in DCP's own format (its ``.metadata`` first, then its
    ``.distcp`` files). A location whose ``manifest.json`` is no torchstow
    manifest this version reads (or whose ``.metadata`` is no DCP metadata)
    is refused with :class:`CorruptCheckpointError` (:class:`FormatVersionError`
    for a newer format) and nothing is deleted.
    """
    text, backend = backend_at(uri, storage_options)
    if not isinstance(backend, StoreBackend):
        backend.delete(text)
        return
    store = backend.open_store(text)
    files = store.list_files()
    if MANIFEST in files:
        _check_readable(store.location, MANIFEST, lambda: read_manifest(store))
    elif DCP_METADATA in files:
        source = f"{store.location}/{DCP_METADATA}"
        _check_readable(
            store.location,
            DCP_METADATA,
            lambda: decode_dcp_metadata(store.read_file(DCP_METADATA), source=source),
        )
        doomed = dcp_files(files)
        logger.info("deleting the DCP-format checkpoint %s", store.location)
        store.delete_files(doomed[:1])
        store.delete_files(doomed[1:])
        if len(doomed) == len(files):
            store.remove_location()
        return
    backend.delete(text)


def _check_readable(location: str, name: str, decode: Callable[[], object]) -> None:
    """Run ``decode`` (reading the manifest ``name``); refuse to delete what it cannot read."""
    try:
        decode()
    except FormatVersionError as exc:
        raise FormatVersionError(f"{exc}; nothing was deleted at {location}") from exc
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(
            f"{location} is not a checkpoint this torchstow can delete: its {name} does not decode "
            f"({exc}); nothing was deleted (remove it by hand if it is yours to remove)"
        ) from exc
