"""``copy``: a checkpoint from any backend to any backend, streamed, verified, committed last."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from torchstow.core.layout.location import check_vacant, dcp_files, read_manifest
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.store import ByteStore, FileSink
from torchstow.errors import CheckpointNotFoundError, ChecksumMismatchError
from torchstow.format.codec import encode_metadata
from torchstow.format.files import MANIFEST, is_data_file
from torchstow.management.datafiles import Problem, Span, spans_by_file
from torchstow.management.datafiles import scan_file as _scan_file
from torchstow.management.verify import ProgressCallback
from torchstow.plugins.manager import default_registry

__all__ = ["copy"]

_THREADS = 4


def _copy_files(
    src: ByteStore,
    dst: ByteStore,
    files: dict[str, list[Span]],
    names: dict[str, str],
    progress: ProgressCallback | None,
) -> None:
    total = sum(max(s.end for s in spans) for spans in files.values())
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
            if source is not None and sink.copy_from(source, max(s.end for s in spans)):
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
            results = list(pool.map(one, files))
    problems = [p for found in results for p in found]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ChecksumMismatchError(
            f"copying {src.location}: {problems[0]}{more}; nothing was committed at {dst.location}"
        )


def _copy_store(
    src_store: ByteStore, dst_store: ByteStore, overwrite: bool, progress: ProgressCallback | None
) -> None:
    try:
        metadata = read_manifest(src_store)
    except CheckpointNotFoundError:
        from torchstow.interop.sources import is_dcp

        if not is_dcp(src_store.list_files()):
            raise
        raise CheckpointNotFoundError(
            f"{src_store.location} holds a torch.distributed.checkpoint (DCP) checkpoint, not a "
            "torchstow one, and copy converts nothing: convert it instead "
            "(torchstow convert SRC DST --to torchstow, or --to dcp)"
        ) from None
    dst_store.prepare()
    if not overwrite:
        check_vacant(dst_store)
    files = spans_by_file(metadata)
    copy_id = uuid.uuid4().hex[:12]
    names = {name: f"data-{copy_id}-{i}.bin" for i, name in enumerate(sorted(files))}
    dst_store.ensure_capacity(sum(max(s.end for s in spans) for spans in files.values()))
    try:
        _copy_files(src_store, dst_store, files, names, progress)
    except BaseException:
        with contextlib.suppress(Exception):
            dst_store.delete_files(list(names.values()))
        raise
    if isinstance(metadata.storage_data, dict):
        metadata.storage_data = {
            index: replace(info, relative_path=names[info.relative_path])
            for index, info in metadata.storage_data.items()
        }
    dst_store.publish(MANIFEST, encode_metadata(metadata))
    live = set(names.values())
    with contextlib.suppress(Exception):  # housekeeping after the commit never fails the copy
        dst_store.delete_files([f for f in dst_store.list_files() if is_data_file(f) and f not in live])
        if overwrite:  # a replaced DCP-format checkpoint: its .metadata must not outlive it
            dst_store.delete_files(dcp_files(dst_store.list_files()))


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> None:
    """Copy the committed checkpoint at ``src`` to ``dst`` (URIs or paths), on any backends.

    Data files stream through in bounded segments (a few MiB per file in
    flight, a few files at a time), every block is checked against its
    checksum on the way (a mismatch raises :class:`ChecksumMismatchError`
    and commits nothing), and the manifest is published last. Between
    stores whose sinks can (local files), the kernel copies each file and
    its blocks are checked by reading the copy back. A committed
    checkpoint at ``dst`` raises :class:`CheckpointExistsError` unless
    ``overwrite``; the old one stays valid until the copy commits.
    Backends that are not byte stores are copied tensor by tensor through
    their reader and writer.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    registry = default_registry()
    src_backend = registry.backend_for(src, src_storage_options)
    dst_backend = registry.backend_for(dst, dst_storage_options)
    if isinstance(src_backend, StoreBackend) and isinstance(dst_backend, StoreBackend):
        src_store = src_backend.open_store(src)
        dst_store = dst_backend.open_store(dst)
        if src_store.location.rstrip("/") == dst_store.location.rstrip("/") and type(src_store) is type(
            dst_store
        ):
            raise ValueError(f"cannot copy {src} onto itself")
        _copy_store(src_store, dst_store, overwrite, progress)
        return
    from torchstow.interop.convert import convert

    convert(
        src,
        dst,
        to="torchstow",
        src_storage_options=src_storage_options,
        dst_storage_options=dst_storage_options,
        overwrite=overwrite,
        progress=progress,
    )
