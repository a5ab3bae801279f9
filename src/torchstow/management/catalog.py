"""The checkpoints under a prefix, by their manifests: info, listing, latest, delete.

These read manifests only (torchstow's or DCP's ``.metadata``), never data
files, except :func:`latest` with ``verified=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from torchstow.core.layout.commit import manifest_files
from torchstow.core.layout.location import dcp_files, read_dcp_metadata, read_manifest, stray_dcp_files
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.store import ByteStore
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    SaveInFlightError,
)
from torchstow.format.files import DCP_METADATA, MANIFEST, is_checkpoint_file
from torchstow.format.manifest import CheckpointInfo
from torchstow.management import listing
from torchstow.management.gc import GRACE, in_flight
from torchstow.management.listing import checkpoint_info
from torchstow.management.steps import names_a_step
from torchstow.management.verify import verify
from torchstow.plugins.resolve import Uri, backend_at

__all__ = ["checkpoint_info", "delete", "info", "latest", "list_checkpoints", "list_steps"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


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
    found = []
    for entry in listing.entries(backend, listing.children_of(backend, text)):
        if entry.info is not None:
            found.append(entry.info)
        elif entry.status == listing.UNREADABLE:
            logger.warning("skipping %s: %s", entry.uri, entry.error)
    return found


def list_steps(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> list[CheckpointInfo]:
    """The steps of the run under ``uri``: the committed checkpoints there whose names end in a
    step (:func:`~torchstow.management.steps.names_a_step`), oldest first; a user's ``best``
    or ``final`` beside them is none, whatever ``step`` its user metadata holds."""
    return [i for i in list_checkpoints(uri, storage_options=storage_options) if names_a_step(i.uri)]


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


def delete(uri: Uri, *, storage_options: dict[str, Any] | None = None, force: bool = False) -> None:
    """Remove the checkpoint at ``uri``, manifest first, so it is never half valid.

    A torchstow checkpoint (committed, or the data of a save that never
    committed), or one in DCP's own format (its ``.metadata`` first, then its
    ``.distcp`` files; or only those where a DCP save or a deletion left them without a
    ``.metadata``). A location whose ``manifest.json`` is no torchstow
    manifest this version reads (or whose ``.metadata`` is no DCP metadata)
    is refused with :class:`CorruptCheckpointError` (:class:`FormatVersionError`
    for a newer format) and nothing is deleted; so is, with
    :class:`CheckpointNotFoundError`, a location without either whose files are none
    that torchstow writes (a user's ``data-train.bin`` is not one), and, with ValueError, a
    location that is a symbolic link (deleting through it would delete what it points at).

    On a byte-store backend, a location where a save may be in flight, as
    :func:`torchstow.gc` judges it (files no committed manifest names, written within
    its grace period, or a multipart upload started within it) is refused with
    :class:`SaveInFlightError` and nothing is deleted, unless ``force`` (a save known to
    be dead). A save that starts between the check and the deletion is not caught.
    Other backends delete as their own ``delete`` does.
    """
    text, backend = backend_at(uri, storage_options)
    if not isinstance(backend, StoreBackend):
        backend.delete(text)
        return
    store = backend.open_store(text)
    _refuse_link(store)
    files = store.list_files()
    blocker = None if files else listing.file_in_the_way(backend, text)
    if blocker is not None:  # rm notes.txt, rm step-1/manifest.json
        raise CheckpointNotFoundError(
            f"no checkpoint at {text}: {listing.what_file(blocker)}; nothing was deleted"
        )
    listed = None
    if MANIFEST in files:
        listed = manifest_files(_check_readable(store.location, MANIFEST, lambda: read_manifest(store)))
    elif DCP_METADATA in files:
        _check_readable(store.location, DCP_METADATA, lambda: read_dcp_metadata(store))
        doomed = dcp_files(files)
        logger.info("deleting the DCP-format checkpoint %s", store.location)
        store.delete_files(doomed[:1])
        store.delete_files(doomed[1:])
        if len(doomed) == len(files):
            store.remove_location()
        return
    stray = stray_dcp_files(files)
    ours = any(is_checkpoint_file(name) for name in files)
    if MANIFEST not in files and files and not stray and not ours:
        raise CheckpointNotFoundError(
            f"no checkpoint at {store.location}: no manifest, and none of its files is one "
            "torchstow writes; nothing was deleted"
        )
    if not force:
        _refuse_in_flight(store, files, listed)
    replaced = dcp_files(files, stray=True) if MANIFEST in files else []
    if replaced:
        # a DCP checkpoint this one replaced, whose removal after the commit was cut short:
        # it goes first (its .metadata first), or it would show again once the manifest is gone
        store.delete_files(replaced[:1])
        store.delete_files(replaced[1:])
    if stray:  # a DCP checkpoint's data without its .metadata (a DCP save that died, a deletion cut short)
        logger.info("deleting DCP's data files without a .metadata at %s", store.location)
        store.delete_files(stray)
        if not ours:
            if len(stray) == len(files):
                store.remove_location()
            return
    backend.delete(text)


def _refuse_link(store: ByteStore) -> None:
    """ValueError when ``store``'s location is a symbolic link: deleting through it would
    delete the files of the checkpoint it points at and leave the link dangling."""
    target = listing.link_target(store)
    if target is None:
        return
    raise ValueError(
        f"{store.location} is a symbolic link (to {target}), not a checkpoint of its own: nothing "
        f"was deleted. To delete the checkpoint, delete {target}; to remove the link, remove it "
        "as a file (rm, os.unlink)"
    )


def _refuse_in_flight(store: ByteStore, files: list[str], listed: set[str] | None) -> None:
    """SaveInFlightError when gc would leave files at ``store`` alone as a save's in flight
    (``files``: the location's listing; ``listed``: what its committed manifest names)."""
    try:
        young = in_flight(store, files=files, listed=listed)
    except FileNotFoundError:
        if files:
            raise
        return  # nothing there, not even its bucket: no save either (the deletion says so)
    if young:
        shown = ", ".join(young[:3]) + (f" and {len(young) - 3} more" if len(young) > 3 else "")
        files_young = f"{len(young)} file" + ("s" if len(young) > 1 else "")
        raise SaveInFlightError(
            f"a save may be in flight at {store.location}: {files_young} no committed manifest names, "
            f"written within gc's grace period of {GRACE:g} s ({shown}); nothing was deleted. Pass "
            "--force to torchstow rm (force=True to torchstow.delete) if no save is running there"
        )


def _check_readable(location: str, name: str, decode: Callable[[], _T]) -> _T:
    """Run ``decode`` (reading the manifest ``name``); refuse to delete what it cannot read."""
    try:
        return decode()
    except FormatVersionError as exc:
        raise FormatVersionError(f"{exc}; nothing was deleted at {location}") from exc
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(
            f"{location} is not a checkpoint this torchstow can delete: its {name} does not decode "
            f"({exc}); nothing was deleted (remove it by hand if it is yours to remove)"
        ) from exc
