"""``copy``: a checkpoint from any backend to any backend, streamed, verified, committed last."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from torchstow.core.layout.commit import CommitOutcome, committed_files, publish_manifest
from torchstow.core.layout.location import check_vacant, dcp_files, manifest_bytes, read_manifest
from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.core.storage.store import ByteStore, FileSink
from torchstow.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    TorchstowError,
)
from torchstow.format.compression import check_compression
from torchstow.format.dcp_metadata import decode_dcp_metadata
from torchstow.format.files import DCP_METADATA, MANIFEST
from torchstow.format.table import TableLocations
from torchstow.interop.sources import file_in_the_way, local_folder
from torchstow.interop.targets import no_place
from torchstow.management.catalog import info
from torchstow.management.datafiles import FileSpans, Problem, segment_bytes, spans_by_file
from torchstow.management.datafiles import scan_file as _scan_file
from torchstow.management.listing import COMMITTED, link_target, scan
from torchstow.management.verify import ProgressCallback
from torchstow.plugins.resolve import backend_at, checkpoint_uri

__all__ = ["RunCopy", "copy", "copy_destination", "copy_run"]

_THREADS = 4


def _copy_files(
    src: ByteStore,
    dst: ByteStore,
    files: dict[str, FileSpans],
    names: dict[str, str],
    progress: ProgressCallback | None,
) -> None:
    total = sum(spans.end for spans in files.values())
    lock = threading.Lock()
    failed = threading.Event()

    def advance(nbytes: int) -> None:
        if progress is not None:
            with lock:
                progress(nbytes, total)

    def one(name: str) -> list[Problem]:
        sink: FileSink = dst.create(names[name])
        try:
            spans = files[name]
            source = src.local_path(name)
            if source is not None and sink.copy_from(source, spans.end):
                # Copied in the kernel: every block is checked where it landed.
                found = _scan_file(dst, names[name], spans, progress=advance, stop=failed)
                problems = [replace(p, file=name) for p in found]
            else:
                problems = _scan_file(
                    src,
                    name,
                    spans,
                    write=lambda buf: sink.write([buf]),
                    progress=advance,
                    stop=failed,
                    write_keeps=sink.keeps_buffers,
                )
            if problems or failed.is_set():
                failed.set()
                sink.abort()
            else:
                sink.close()
        except BaseException:
            failed.set()
            sink.abort()
            raise
        return problems

    threads = min(_THREADS, len(files))
    if threads <= 1:
        results = [one(name) for name in files]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="torchstow-copy") as pool:
            futures = [pool.submit(one, name) for name in files]
            try:
                results = [future.result() for future in futures]
            except BaseException:  # Ctrl-C lands here: the other files stop at their next segment
                failed.set()
                for future in futures:
                    future.cancel()
                raise
    problems = [p for found in results for p in found]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ChecksumMismatchError(
            f"copying {src.location}: {problems[0]}{more}; nothing was committed at {dst.location}"
        )


def _copy_whole_file(
    src: ByteStore, dst: ByteStore, name: str, size: int, advance: Callable[[int], None]
) -> None:
    """``name`` from ``src`` to ``dst`` as it is, in segments (in the kernel where it can)."""
    sink = dst.create(name)
    try:
        source = src.local_path(name)
        if source is not None and sink.copy_from(source, size):
            advance(size)
        else:
            seg = segment_bytes(src)
            scratch = None if sink.keeps_buffers else memoryview(bytearray(min(seg, size)))
            pos = 0
            while pos < size:
                n = min(seg, size - pos)
                buf = scratch[:n] if scratch is not None else memoryview(bytearray(n))
                src.read_into(name, [(pos, buf)])
                sink.write([buf])
                advance(n)
                pos += n
    except BaseException:
        sink.abort()
        raise
    sink.close()


def _prepare(dst_store: ByteStore) -> None:
    """Make the copy's location; one that is a file, or lies under one, is refused (ValueError)."""
    try:
        dst_store.prepare()
    except (FileExistsError, NotADirectoryError) as exc:
        if isinstance(exc, TorchstowError):
            raise
        raise no_place(dst_store.location, "copy", "copied") from exc


def _copy_dcp(
    src_store: ByteStore, dst_store: ByteStore, overwrite: bool, progress: ProgressCallback | None
) -> None:
    """Copy a DCP checkpoint as DCP: the files its ``.metadata`` names, byte for byte
    (DCP records no checksums: their sizes are checked), then ``.metadata`` last."""
    where = src_store.location
    raw = manifest_bytes(src_store, DCP_METADATA)
    metadata = decode_dcp_metadata(raw, source=f"{where}/{DCP_METADATA}")
    sizes = src_store.file_sizes() or {}
    needs: dict[str, int] = {}
    for place in (metadata.storage_data or {}).values():
        needs[place.relative_path] = max(needs.get(place.relative_path, 0), place.offset + place.length)
    for name, end in sorted(needs.items()):
        if name == DCP_METADATA or "/" in name:
            raise CorruptCheckpointError(f"{where}/{DCP_METADATA} names {name!r} as a data file")
        if sizes and sizes.get(name, -1) < end:
            have = "is missing" if name not in sizes else f"holds {sizes[name]:,} bytes"
            raise CorruptCheckpointError(
                f"{where}/{name} {have}, where {DCP_METADATA} needs {end:,}; nothing was copied"
            )
    _prepare(dst_store)
    if not overwrite:
        check_vacant(dst_store)
    existing = dst_store.list_files()
    if DCP_METADATA in existing or MANIFEST in existing:
        # DCP's file names are fixed, so the copy cannot stand beside the old checkpoint until
        # it commits: the old one is withdrawn first (its commit marker first), then its files:
        # those its manifest lists, never other data files (a save in flight may own them).
        replaced = committed_files(dst_store)
        dst_store.delete_files([n for n in (DCP_METADATA, MANIFEST) if n in existing])
        old = [n for n in existing if n in needs or n in replaced or n.endswith(".distcp")]
        dst_store.delete_files(old)
    lengths = {name: sizes.get(name, end) for name, end in needs.items()}
    total = sum(lengths.values())
    dst_store.ensure_capacity(total)

    def advance(nbytes: int) -> None:
        if progress is not None:
            progress(nbytes, total)

    done: list[str] = []  # the files this copy wrote (a file it could not create is another's)
    try:
        for name, size in sorted(lengths.items()):
            _copy_whole_file(src_store, dst_store, name, size, advance)
            done.append(name)
        landed = dst_store.file_sizes()
        for name, size in lengths.items():
            if landed is not None and landed.get(name) != size:
                raise CorruptCheckpointError(
                    f"{where}/{name} changed or ended early while it was copied; nothing was committed"
                )
    except BaseException:
        with contextlib.suppress(Exception):
            dst_store.delete_files(done)
        raise
    dst_store.publish(DCP_METADATA, raw)


def _copy_store(
    src_store: ByteStore, dst_store: ByteStore, overwrite: bool, progress: ProgressCallback | None
) -> None:
    try:
        metadata = read_manifest(src_store)
    except CheckpointNotFoundError:
        from torchstow.interop.sources import is_dcp

        if not is_dcp(src_store.list_files()):
            raise
        _copy_dcp(src_store, dst_store, overwrite, progress)
        return
    _prepare(dst_store)
    if not overwrite:
        check_vacant(dst_store)
    files = spans_by_file(metadata)
    copy_id = uuid.uuid4().hex[:12]
    names = {name: f"data-{copy_id}-{i}.bin" for i, name in enumerate(sorted(files))}
    dst_store.ensure_capacity(sum(spans.end for spans in files.values()))
    try:
        _copy_files(src_store, dst_store, files, names, progress)
    except BaseException:
        with contextlib.suppress(Exception):
            dst_store.delete_files(list(names.values()))
        raise
    if isinstance(metadata.storage_data, TableLocations):  # columns: renamed without an object per item
        metadata.storage_data = metadata.storage_data.renamed(names)
    elif isinstance(metadata.storage_data, dict):
        metadata.storage_data = {
            index: replace(info, relative_path=names[info.relative_path])
            for index, info in metadata.storage_data.items()
        }
    metadata.save_id = uuid.uuid4().hex  # this copy's commit, not the source's
    replaced = committed_files(dst_store) if overwrite else set()
    outcome = CommitOutcome()
    try:
        publish_manifest(dst_store, metadata, overwrite=overwrite, outcome=outcome)
    except BaseException:
        if outcome.landed is False:  # surely not committed: its files go (else a manifest may name them)
            with contextlib.suppress(Exception):
                dst_store.delete_files(list(names.values()))
        raise
    # Only the replaced checkpoint's files go: unlisted ones may be a save in flight.
    with contextlib.suppress(Exception):  # housekeeping after the commit never fails the copy
        dst_store.delete_files(sorted(replaced - set(names.values())))
        if overwrite:  # a replaced DCP-format checkpoint: its .metadata must not outlive it
            dst_store.delete_files(dcp_files(dst_store.list_files()))


def _refuse_through_link(backend: Backend, dst: str, overwrite: bool) -> None:
    """Refuse a ``dst`` that is a symbolic link (``latest -> step-300``): with ``overwrite``
    (ValueError), which would replace the checkpoint it points at under that checkpoint's
    name; without, where that checkpoint is committed (CheckpointExistsError naming what
    works, not ``--overwrite``)."""
    if not isinstance(backend, StoreBackend):
        return
    store = backend.open_store(dst)
    target = link_target(store)
    if target is None:
        return
    if overwrite:
        raise ValueError(
            f"{dst} is a symbolic link (to {target}): overwriting it would replace the checkpoint "
            f"it points at; nothing was copied. Copy to {target} itself, or remove the link first"
        )
    try:
        check_vacant(store)
    except CheckpointExistsError:
        raise CheckpointExistsError(
            f"{dst} is a symbolic link to the checkpoint {target}; nothing was copied. Copy to another "
            f"location, to {target} itself with overwrite=True (--overwrite) to replace it, or remove "
            "the link first (overwrite is refused through a link)"
        ) from None


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _real_name(backend: Backend, uri: str) -> str:
    """The name the location ``uri`` has in its storage: a local folder's own name (a
    ``file://`` URI's last segment percent-decoded, a plain path's and ``fsspec+file://``'s
    as written), else the URI's last segment."""
    folder = local_folder(backend.open_store(uri)) if isinstance(backend, StoreBackend) else None
    return os.path.basename(folder) if folder else _name(uri)


def _child(backend: Backend, prefix: str, name: str) -> str:
    """The URI of the location named ``name`` under ``prefix`` (ending with ``/``): ``name``
    as it is, or with ``%`` written ``%25`` where ``backend`` percent-decodes the URI
    (``file://``), so the location is ``name`` itself."""
    uri = prefix + name
    if "%" in name and _real_name(backend, uri) != name:
        uri = prefix + name.replace("%", "%25")
    return uri


def _refuse_nesting(backend: Backend, container: str, what: str) -> None:
    """ValueError when ``container``, where ``what`` would be copied, is a checkpoint: its
    folder would hold other checkpoints, which ``ls``, ``rm`` and ``gc`` take for its own."""
    try:
        backend.read_metadata(container)
    except (TorchstowError, OSError):  # no committed checkpoint there
        return
    raise ValueError(
        f"{container} is a checkpoint, so it is no place for {what}: a checkpoint's folder that "
        "holds others confuses ls (which lists them instead of it) and rm (which leaves them "
        "there); nothing was copied. Copy to another location"
    )


def copy_destination(src: str, dst: str, src_backend: Backend, dst_backend: Backend) -> str:
    """Where a copy of ``src`` to ``dst`` lands: ``dst`` itself, or ``dst/<name of src>``
    when ``dst`` ends with ``/`` ("into", as ``cp`` and ``aws s3 cp`` read it): the
    source's own name as its storage holds it, written as ``dst``'s URIs need."""
    return _child(dst_backend, dst, _real_name(src_backend, src)) if dst.endswith("/") else dst


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    compression: str | None = None,
) -> str:
    """Copy the committed checkpoint at ``src`` to ``dst`` (URIs or paths), on any
    backends; returns where it landed.

    ``dst`` ending with ``/`` means into it: the copy is ``dst/<name of
    src>``. Otherwise ``dst`` names the copy, and a location that
    holds other locations (a directory of runs or checkpoints) is refused
    rather than made a checkpoint. A ``dst`` that is ``src`` under any spelling
    (a symbolic link, ``..``, ``file://``), or lies inside it, is refused
    with ``ValueError`` before anything is written.

    Data files stream through in bounded segments (a few MiB per file in
    flight, a few files at a time), every block is checked against its
    checksum on the way (a mismatch raises :class:`ChecksumMismatchError`
    and commits nothing), and the manifest is published last. Between
    stores whose sinks can (local files), the kernel copies each file and
    its blocks are checked by reading the copy back. A committed
    checkpoint at ``dst`` raises :class:`CheckpointExistsError` unless
    ``overwrite``; the old one stays valid until the copy commits.
    A DCP checkpoint is copied as DCP: the files its ``.metadata`` names, as
    they are (sizes checked: DCP has no checksums), ``.metadata`` last; with
    ``overwrite``, an old checkpoint there is removed first (DCP's file
    names are fixed). Backends that are not byte stores are copied tensor
    by tensor through their reader and writer.

    A compressed checkpoint is copied as it is stored (its codecs kept). With
    ``compression="zstd"`` the copy is written anew instead, tensor by tensor as
    ``convert(..., to="torchstow", compression=...)`` writes it: every item
    decompressed, checked, and compressed again.
    """
    from torchstow.interop.convert import check_apart, convert
    from torchstow.interop.sources import is_safetensors, local_path

    check_compression(compression)
    src, src_backend = backend_at(src, src_storage_options)
    dst, dst_backend = backend_at(dst, dst_storage_options)  # dst/<name> is on the same backend
    if dst.endswith("/"):
        _refuse_nesting(dst_backend, dst.rstrip("/"), "a copy of a checkpoint")
    dst = checkpoint_uri(copy_destination(src, dst, src_backend, dst_backend))
    check_apart(src, dst, "copy")
    try:
        inside = dst_backend.list_children(dst)
    except CheckpointNotFoundError:
        inside = []  # a bucket not made yet: the copy makes it
    if inside:
        raise ValueError(
            f"{dst} holds other locations ({inside[0]} ...), so it is no place for one checkpoint; "
            f"copy into it with {dst.rstrip('/')}/ as the destination"
        )
    if file_in_the_way(dst_backend, dst) is not None:  # before any byte is read, on either path
        raise no_place(dst, "copy", "copied")
    _refuse_through_link(dst_backend, dst, overwrite)
    folder = local_path(dst)
    if folder is not None and is_safetensors(folder):  # --overwrite replaces no other format's files
        raise CheckpointExistsError(
            f"{dst} holds a safetensors checkpoint, which would hide a torchstow one copied beside it "
            "(info, inspect, verify and convert read the safetensors); nothing was copied. Remove it "
            "first, or copy to another location"
        )
    if (
        compression is None  # else every item is written anew
        and isinstance(src_backend, StoreBackend)
        and isinstance(dst_backend, StoreBackend)
    ):
        _copy_store(src_backend.open_store(src), dst_backend.open_store(dst), overwrite, progress)
        return dst
    convert(
        src,
        dst,
        to="torchstow",
        src_storage_options=src_storage_options,
        dst_storage_options=dst_storage_options,
        overwrite=overwrite,
        progress=progress,
        compression=compression,
    )
    return dst


@dataclass(frozen=True)
class RunCopy:
    """What :func:`copy_run` did: ``copied`` pairs ``(source, destination)``, ``skipped``
    pairs ``(source, why)`` for the checkpoints left behind, and ``dst`` the run's copy
    (``dst_prefix/<run name>`` for a ``dst_prefix`` ending with ``/``)."""

    copied: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    dst: str = ""


def copy_run(
    src_prefix: str | os.PathLike[str],
    dst_prefix: str | os.PathLike[str],
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    compression: str | None = None,
) -> RunCopy:
    """Copy every committed checkpoint directly under ``src_prefix`` (a run) to
    ``dst_prefix/<its name>``, oldest first, each as :func:`copy` copies one;
    incomplete and unreadable ones are skipped and reported. ``dst_prefix`` ending
    with ``/`` means into it (``dst_prefix/<run name>/<checkpoint name>``). A committed
    checkpoint at any destination is an error before anything is copied, unless
    ``overwrite``; so is (``ValueError``) a destination inside ``src_prefix`` or that is
    it, under any spelling. A checkpoint deleted after the listing (a training job's
    retention pruned it) is skipped and reported, and the others are still copied.
    ``compression`` is as in :func:`copy`."""
    from torchstow.interop.convert import check_apart

    check_compression(compression)
    src, src_backend = backend_at(src_prefix, src_storage_options)
    dst_prefix_text, dst_backend = backend_at(dst_prefix, dst_storage_options)
    dst = copy_destination(src, dst_prefix_text, src_backend, dst_backend).rstrip("/")
    entries = scan(src, storage_options=src_storage_options)
    plan = [
        (e.uri, _child(dst_backend, f"{dst}/", _real_name(src_backend, e.uri)))
        for e in entries
        if e.status == COMMITTED
    ]
    skipped = [(e.uri, f"{e.status}: {e.error}") for e in entries if e.status != COMMITTED]
    if not plan:
        raise CheckpointNotFoundError(f"no committed checkpoint under {src} to copy")
    into = [dst_prefix_text.rstrip("/")] if dst_prefix_text.endswith("/") else []
    for container in [*into, dst]:
        _refuse_nesting(dst_backend, container, "a run's checkpoints")
    for _, target in plan:  # a copy inside the run: the run copied into itself, and on each copy
        check_apart(src, target, "copy")
        _refuse_through_link(dst_backend, target, overwrite)  # each, before anything is copied
    if not overwrite:
        taken = []
        for _, target in plan:
            with contextlib.suppress(CheckpointNotFoundError, IncompleteCheckpointError):
                taken.append(info(target, storage_options=dst_storage_options).uri)
        if taken:
            raise CheckpointExistsError(
                f"checkpoints already exist at {', '.join(taken)}; nothing was copied. "
                "Pass overwrite=True (--overwrite) to replace them"
            )
    total = sum(e.info.nbytes for e in entries if e.info is not None)

    def advance(nbytes: int, _total: int) -> None:
        if progress is not None:
            progress(nbytes, total)

    copied = []
    for source, target in plan:
        try:
            copy(
                source,
                target,
                src_storage_options=src_storage_options,
                dst_storage_options=dst_storage_options,
                overwrite=overwrite,
                progress=advance,
                compression=compression,
            )
        except Exception:
            # deleted since the listing (a training job's retention pruned it, before or during
            # its copy, which then left nothing at the target): skipped, as aws s3 sync skips a
            # file that vanished; the rest of the run is still copied
            if not _gone(source, src_storage_options):
                raise
            skipped.append((source, "deleted since it was listed"))
            continue
        copied.append((source, target))
    return RunCopy(copied, skipped, dst)


def _gone(uri: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether the checkpoint listed at ``uri`` is gone: nothing there any more, or its data
    without its manifest (a deletion under way: the manifest goes first)."""
    try:
        info(uri, storage_options=storage_options)
    except (CheckpointNotFoundError, IncompleteCheckpointError):
        return True
    except Exception:
        return False
    return False
