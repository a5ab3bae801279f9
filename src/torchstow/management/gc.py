"""``gc``: remove what killed or failed saves left behind, once older than a grace period.

Debris is what no committed manifest names: data files of a save that never
committed beside a committed checkpoint, the files of an incomplete checkpoint
(data without a manifest), manifest temporaries, and (on S3) multipart uploads
never completed nor aborted. A save (or copy) in flight writes such files too,
so gc judges the files of one save or copy (their names carry its id) together,
by the newest of them: they go only when even that one is older than ``older_than``.
Only names torchstow writes are judged: a user's file that merely starts with ``data-``
is never debris.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torchstow.core.layout.commit import listed_files
from torchstow.core.layout.location import stray_dcp_files
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.store import ByteStore, PendingUpload
from torchstow.errors import CheckpointNotFoundError
from torchstow.format.files import DCP_METADATA, MANIFEST, is_checkpoint_file, save_id_of
from torchstow.management.listing import UNREADABLE, IsACheckpointError, is_link, scan
from torchstow.plugins.resolve import backend_at

__all__ = ["GRACE", "GcReport", "gc", "in_flight"]

logger = logging.getLogger("torchstow")

#: Seconds since a save's newest file was written after which gc judges it dead (its default).
GRACE = 3600.0


@dataclass
class GcReport:
    """What :func:`gc` removed (or, with ``dry_run``, would remove) under ``uri``.

    ``removed``: the files' URIs; ``aborted``: the URIs of the objects whose
    multipart uploads were aborted; ``kept``: debris younger than the grace
    period (a save may still be writing it) or of unknown age; ``skipped``:
    locations left alone, with why; ``bytes_freed``: the removed files' size
    where the store tells it.
    """

    uri: str
    older_than: float
    dry_run: bool
    removed: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values."""
        return asdict(self)


_STRAY_DCP = (
    "DCP's data files (*.distcp) without its .metadata: a DCP save that died or is still running, "
    "or an interrupted deletion; gc leaves them (torchstow rm deletes them)"
)


def _group(name: str) -> str:
    """The save a debris file belongs to: its save id, else the file alone."""
    return save_id_of(name) or name


def _old_groups(
    names: Iterable[str], times: dict[str, float] | None, cutoff: float, uploads: Iterable[PendingUpload]
) -> tuple[set[str], set[str]]:
    """``(old, young)``: ``names`` split by whether every file of their save is older than
    ``cutoff``, the save's ``uploads`` in progress (their last activity) counted too."""
    names = set(names)
    if times is None:
        return set(), names
    newest: dict[str, float] = {}
    for name in names:
        group = _group(name)
        newest[group] = max(newest.get(group, 0.0), times.get(name, float("inf")))
    for upload in uploads:  # a file of the save still uploading: the save is as young as it
        group = _group(upload.name)
        if group in newest:
            newest[group] = max(newest[group], upload.started)
    old = {n for n in names if newest[_group(n)] < cutoff}
    return old, names - old


def _debris(
    store: ByteStore, cutoff: float, files: list[str] | None = None, listed: set[str] | None = None
) -> tuple[set[str], set[str]] | str:
    """``(old, young)``: the checkpoint files at ``store`` that no committed manifest names,
    split by whether their save's newest file is older than ``cutoff`` (young: a save may
    still be writing them; of unknown age counts as young); or why the location is left alone.
    ``files`` (the location's listing) and ``listed`` (what its manifest names) when known."""
    files = store.list_files() if files is None else files
    if DCP_METADATA in files and MANIFEST not in files:  # with a manifest: torchstow's, as it reads
        return "a checkpoint in DCP's format"
    # only names torchstow writes, and DCP's data a DCP save or a deletion left without its
    # .metadata (each file judged alone: they carry no save id)
    debris = {f for f in files if is_checkpoint_file(f)} | set(stray_dcp_files(files))
    if debris and MANIFEST in files:
        listed = listed_files(store) if listed is None else listed
        if listed is None:
            return "its manifest could not be read"
        debris -= listed
    if not debris:
        return set(), set()
    return _old_groups(debris, store.file_times(), cutoff, store.pending_uploads())


def in_flight(
    store: ByteStore,
    older_than: float = GRACE,
    *,
    files: list[str] | None = None,
    listed: set[str] | None = None,
) -> list[str]:
    """What a save may still be writing at ``store``'s location, as :func:`gc` judges it
    (and so leaves alone): the files no committed manifest names whose save's newest file
    is younger than ``older_than`` seconds (or of unknown age), and the multipart uploads
    started since; their names, sorted. A location gc would skip (unreadable manifest,
    DCP's format) has none. ``files`` and ``listed``: the location's listing and the files
    its committed manifest names, where the caller read them already (read here otherwise)."""
    cutoff = time.time() - older_than
    found = _debris(store, cutoff, files, listed)
    young = set() if isinstance(found, str) else found[1]
    return sorted(young | {u.name for u in store.pending_uploads() if u.started >= cutoff})


def _collect_location(store: ByteStore, cutoff: float, report: GcReport) -> None:
    files = store.list_files()
    found = _debris(store, cutoff, files)
    if isinstance(found, str):
        report.skipped[store.location] = found
        return
    old, young = found
    stray = set(stray_dcp_files(files))
    if stray:  # reported, never removed: DCP's saves are not torchstow's to judge
        report.skipped[store.location] = _STRAY_DCP
        old, young = old - stray, young - stray
    report.kept += [f"{store.location}/{n}" for n in sorted(young)]
    if not old:
        return
    # A save may have committed since the listing: never remove what a manifest now names.
    listed = listed_files(store) if MANIFEST in store.list_files() else set()
    if listed is None:
        report.skipped[store.location] = "its manifest could not be read"
        return
    doomed = sorted(old - listed)
    sizes = store.file_sizes() or {}
    report.bytes_freed += sum(sizes.get(n, 0) for n in doomed)
    report.removed += [f"{store.location}/{n}" for n in doomed]
    if not report.dry_run:
        logger.info("gc: removing %d file(s) from %s", len(doomed), store.location)
        store.delete_files(doomed)
        if not store.list_files():
            store.remove_location()


def gc(
    uri_or_prefix: str | os.PathLike[str],
    *,
    older_than: float = GRACE,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> GcReport:
    """Remove what killed or failed saves left at a checkpoint or under a prefix of them.

    At each checkpoint location directly under ``uri_or_prefix`` (or at that
    location itself): data files its committed manifest does not name, or,
    without a manifest, every data file (an incomplete checkpoint), and on S3
    the multipart uploads of files torchstow writes never completed nor aborted
    under the prefix (another program's are reported under ``skipped``). Only
    debris older than ``older_than`` seconds goes (by file modification time,
    S3's ``LastModified`` and an upload's ``Initiated``), judged per save: the
    files of a save still in flight are never removed while its newest file is
    younger than that. Files a committed manifest names, checkpoints in DCP's
    own format (and DCP's ``.distcp`` files without a ``.metadata``, reported
    under ``skipped``), unreadable manifests' locations and symbolic links under the prefix
    (never followed) are left alone; a store that
    cannot date its files keeps them. Returns a :class:`GcReport`. Nothing at all at
    ``uri_or_prefix`` (no file, no upload: a path that does not exist, a typo) is a
    :class:`CheckpointNotFoundError`, as for ``ls``.
    """
    if isinstance(older_than, bool) or not isinstance(older_than, int | float) or not older_than >= 0:
        raise ValueError(f"older_than must be a non-negative number of seconds, got {older_than!r}")
    text, backend = backend_at(uri_or_prefix, storage_options)
    report = GcReport(text, float(older_than), dry_run)
    if not isinstance(backend, StoreBackend):
        report.skipped[text] = f"{type(backend).__name__} keeps no byte store to collect from"
        return report
    cutoff = time.time() - older_than
    try:
        entries = scan(text, storage_options=storage_options)
        report.skipped.update(
            {e.uri: "its manifest could not be read" for e in entries if e.status == UNREADABLE}
        )
        locations = [e.uri for e in entries if e.status != UNREADABLE and not is_link(backend, e.uri)]
    except IsACheckpointError:
        locations = [text]
    except CheckpointNotFoundError as nothing:
        locations = [text]  # an incomplete checkpoint itself, or nothing
        top = backend.open_store(text)
        try:
            empty = not top.list_files() and not top.pending_uploads()
        except FileNotFoundError:  # a bucket that does not exist: as the listing said
            empty = True
        if empty:  # nothing there at all, not even an upload: a typo, not a clean prefix
            raise nothing
    top = backend.open_store(text)
    for location in locations:
        _collect_location(backend.open_store(location), cutoff, report)
    for upload in top.pending_uploads():
        where = f"{top.location}/{upload.name}"
        if not is_checkpoint_file(upload.name.rsplit("/", 1)[-1]):  # another program's upload
            report.skipped[where] = "an upload of a file torchstow never writes"
            continue
        if upload.started >= cutoff:
            report.kept.append(where)
            continue
        report.aborted.append(where)
        if not dry_run:
            top.abort_upload(upload)
    return report
