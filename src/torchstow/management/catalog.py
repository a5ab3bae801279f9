"""The checkpoints under a prefix, by their manifests: info, listing, latest, delete.

These read manifests only (torchstow's or DCP's ``.metadata``), never data
files, except :func:`latest` with ``verified=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from torchstow.core.layout.location import dcp_files, read_manifest
from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import (
    CorruptCheckpointError,
    FormatVersionError,
)
from torchstow.format.files import DCP_METADATA, MANIFEST
from torchstow.format.manifest import CheckpointInfo
from torchstow.interop import dcp_format
from torchstow.management import listing
from torchstow.management.listing import checkpoint_info
from torchstow.plugins.manager import default_registry

__all__ = ["checkpoint_info", "checkpoint_uri", "delete", "info", "latest", "list_checkpoints"]

logger = logging.getLogger("torchstow")

Uri = str | os.PathLike[str]


def checkpoint_uri(uri: Uri) -> str:
    """``uri`` as a string, as backends take it (see :meth:`BackendRegistry.canonical_uri`:
    ``S3://b/x`` is ``s3://b/x``, ``s3:/b/x`` an error); a clear error for an empty or
    non-path value."""
    text = os.fspath(uri)
    if not isinstance(text, str) or not text:
        raise ValueError(f"a checkpoint URI must be a non-empty string or path, got {uri!r}")
    return default_registry().canonical_uri(text)


def info(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """A summary of the checkpoint at ``uri`` from its manifest (no data files read)."""
    text = checkpoint_uri(uri)
    backend = default_registry().backend_for(text, storage_options)
    return checkpoint_info(text, dcp_format.read_any_metadata(backend, text))


def list_checkpoints(prefix: Uri, *, storage_options: dict[str, Any] | None = None) -> list[CheckpointInfo]:
    """The committed checkpoints directly under ``prefix``, oldest first.

    Ordered by step (see :func:`torchstow.management.steps.step_of`; none first),
    then by commit time. Incomplete and unreadable checkpoints are skipped.
    """
    text = checkpoint_uri(prefix)
    backend = default_registry().backend_for(text, storage_options)
    found = []
    for entry in listing.entries(backend, listing.children_of(backend, text)):
        if entry.info is not None:
            found.append(entry.info)
        elif entry.status == listing.UNREADABLE:
            logger.warning("skipping %s: %s", entry.uri, entry.error)
    return found


def latest(
    prefix: Uri, *, storage_options: dict[str, Any] | None = None, verified: bool = False
) -> str | None:
    """The URI of the newest committed checkpoint under ``prefix``, or None.

    With ``verified=True``, the newest one whose every byte passes
    :func:`torchstow.verify` (older ones are tried in turn).
    """
    found = list_checkpoints(prefix, storage_options=storage_options)
    if not verified:
        return found[-1].uri if found else None
    from torchstow.management.verify import verify

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
    text = checkpoint_uri(uri)
    backend = default_registry().backend_for(text, storage_options)
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
            lambda: dcp_format.decode_dcp_metadata(store.read_file(DCP_METADATA), source=source),
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
