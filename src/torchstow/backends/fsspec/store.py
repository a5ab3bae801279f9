"""The fsspec backend: checkpoints on object stores and any other fsspec filesystem.

``s3://bucket/run/step-100``, ``gs://...`` (with gcsfs), ``az://...`` (with
adlfs), ``memory://...``, and any other fsspec protocol spelled
``fsspec+<protocol>://...``. ``storage_options`` this backend does not know
go to the fsspec filesystem unchanged (``endpoint_url``, ``key``,
``secret``, ``client_kwargs``, ``anon`` ... for S3).

A checkpoint is a "directory" of objects: data files, then ``manifest.json``,
written last as one object (an object PUT is atomic, so no rename is
needed). Every request is retried on transient errors with backoff
(:mod:`torchstow.core.storage.retry`). On S3 (s3fs) data files are multipart uploads
whose parts go up concurrently, reads are concurrent ranged GETs, and
botocore's and s3fs's own retries are turned off so the one retry policy
here decides (``retry_attempts`` requests at most, each logged).

fsspec and the protocol's library (s3fs, gcsfs ...) are imported when the
scheme is first used; a missing library gives an install hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torchstow import hookimpl
from torchstow.core.storage.backend import DirectoryBackend
from torchstow.core.storage.retry import RetryPolicy, error_status
from torchstow.core.storage.store import Buffer, ByteStore, FileSink, StorageIOError
from torchstow.errors import CorruptCheckpointError

if TYPE_CHECKING:
    from torchstow.plugins.hookspecs import Register

__all__ = ["FsspecBackend", "FsspecStore", "Tuning", "open_filesystem"]

MiB = 1 << 20
_WRAPPER = "fsspec+"
_INSTALL_HINTS = {
    "s3": "pip install 'torchstow[s3]' (installs s3fs)",
    "s3a": "pip install 'torchstow[s3]' (installs s3fs)",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
    "adl": "pip install adlfs",
    "oss": "pip install ossfs",
    "hdfs": "pip install pyarrow",
    "sftp": "pip install paramiko",
}
# Data files (and threads) per rank: remote stores gain from several objects in
# flight, and the threads mostly wait on the network.
_THREADS = 8
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
_MIN_PART = 5 * MiB  # S3's smallest part (but the last)


@dataclass(frozen=True)
class Tuning:
    """How a store moves bytes: part and range sizes, requests in flight, retries."""

    part_size: int = 16 * MiB
    multipart_threshold: int = 32 * MiB
    range_size: int = 32 * MiB
    concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def split_uri(uri: str) -> tuple[str, str]:
    """``(protocol, fsspec URL)`` for a checkpoint URI (``fsspec+ftp://h/p`` -> ``ftp``, ``ftp://h/p``)."""
    url = uri[len(_WRAPPER) :] if uri.startswith(_WRAPPER) else uri
    protocol, sep, _ = url.partition("://")
    if not sep or not protocol:
        raise ValueError(f"{uri!r} is not an fsspec URL (protocol://path, or fsspec+protocol://path)")
    return protocol.lower(), url


_cache: dict[tuple[str, str, int], Any] = {}
_cache_lock = threading.Lock()


def _is_s3(fs_or_class: Any) -> bool:
    """Whether a filesystem (or its class) is s3fs's."""
    protocol = fs_or_class.protocol
    return "s3" in (protocol if isinstance(protocol, tuple | list) else (protocol,)) and hasattr(
        fs_or_class, "_call_s3"
    )


def filesystem_class(uri: str) -> Any:
    """The fsspec filesystem class for ``uri``'s protocol; ImportError with an install hint."""
    import fsspec

    protocol, _ = split_uri(uri)
    try:
        return fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        hint = _INSTALL_HINTS.get(protocol)
        raise ImportError(
            f"{uri!r} needs the fsspec implementation of {protocol!r}, which is not installed"
            + (f": {hint}" if hint else f" ({exc})")
        ) from exc


def filesystem_options(cls: Any) -> list[str]:
    """The keyword options ``cls`` and the fsspec classes it builds on name in their constructors."""
    import inspect

    names = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return sorted(names)


def open_filesystem(uri: str, options: dict[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` built with ``options``, and the path in it.

    Filesystems are cached per process by protocol and options. S3
    filesystems get their own instance whose client does not retry (the
    store's retry policy does), unless ``config_kwargs`` sets ``retries``.
    """
    protocol, url = split_uri(uri)
    from fsspec.utils import tokenize

    cls = filesystem_class(uri)
    kwargs = {**cls._get_kwargs_from_urls(url), **options}
    own_retries = _is_s3(cls) and "retries" not in (kwargs.get("config_kwargs") or {})
    if own_retries:
        kwargs["config_kwargs"] = {
            **(kwargs.get("config_kwargs") or {}),
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        }
    key = (protocol, tokenize(kwargs), os.getpid())
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = cls(**kwargs, skip_instance_cache=True)
            if own_retries:
                fs.retries = 1  # s3fs's own retry loop: one pass, the store retries
            _cache[key] = fs
    return fs, cls._strip_protocol(url)


class _S3:
    """The S3 requests a store makes itself (s3fs's ``_call_s3``), each retried."""

    def __init__(self, fs: Any, retry: RetryPolicy) -> None:
        self.fs = fs
        self.retry = retry

    def call(self, method: str, what: str, **kwargs: Any) -> Any:
        return self.retry.call(lambda: self.fs.call_s3(method, **kwargs), what)

    def submit(self, method: str, what: str, **kwargs: Any) -> Future[Any]:
        """Start a request on the filesystem's event loop; a future of its response."""
        coro = self.retry.acall(lambda: self.fs._call_s3(method, **kwargs), what)
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def bucket_key(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key


class _MultipartSink(FileSink):
    """An S3 object: one PUT up to the multipart threshold, else a multipart
    upload whose parts go up concurrently.

    Bytes are copied once, into the part being filled; while no upload has
    started, full parts are held (a file that ends within the threshold is
    one PUT); past it, each full part is handed to the event loop while the
    next fills. The store's semaphore bounds the parts in flight.
    """

    def __init__(self, store: FsspecStore, s3: _S3, path: str, location: str) -> None:
        self.store = store
        self.s3 = s3
        self.location = location
        self.bucket, self.key = s3.bucket_key(path)
        self.part_size = store.tuning.part_size
        self.threshold = store.tuning.multipart_threshold
        self.part = bytearray(self.part_size)
        self.filled = 0
        self.held: list[bytearray] = []
        self.upload_id: str | None = None
        self.pending: list[tuple[int, Future[Any]]] = []

    def write(self, buffers: Sequence[Buffer]) -> None:
        for buf in buffers:
            view = buf if isinstance(buf, memoryview) else memoryview(buf)
            pos = 0
            while pos < len(view):
                if self.filled == self.part_size:  # a full part, and more bytes follow
                    self._part_full()
                take = min(self.part_size - self.filled, len(view) - pos)
                self.part[self.filled : self.filled + take] = view[pos : pos + take]
                self.filled += take
                pos += take

    def _part_full(self) -> None:
        if self.upload_id is None and (len(self.held) + 1) * self.part_size < self.threshold:
            self.held.append(self.part)  # the file may still end within one PUT
        else:
            for part in self.held:
                self._ship(part)
            self.held = []
            self._ship(self.part)
        self.part = bytearray(self.part_size)
        self.filled = 0

    def _ship(self, data: bytearray) -> None:
        if self.upload_id is None:
            self.upload_id = self.s3.call(
                "create_multipart_upload",
                f"starting the upload of {self.location}",
                Bucket=self.bucket,
                Key=self.key,
            )["UploadId"]
        number = len(self.pending) + 1
        if number > _MAX_PARTS:
            raise ValueError(
                f"{self.location} would need more than {_MAX_PARTS} parts of {self.part_size} bytes; "
                "raise the part_size storage option"
            )
        for _, done in self.pending:  # fail fast if an earlier part failed for good
            if done.done() and done.exception() is not None:
                done.result()
        self.store.slots.acquire()
        future = self.s3.submit(
            "upload_part",
            f"uploading part {number} of {self.location}",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
        )
        future.add_done_callback(lambda _: self.store.slots.release())
        self.pending.append((number, future))

    def close(self) -> None:
        del self.part[self.filled :]  # the last part may be short
        if self.upload_id is None:
            body = self.part if not self.held else bytearray().join([*self.held, self.part])
            self.s3.call(
                "put_object", f"writing {self.location}", Bucket=self.bucket, Key=self.key, Body=body
            )
        else:
            if self.filled:
                self._ship(self.part)
            parts = [{"PartNumber": n, "ETag": f.result()["ETag"]} for n, f in self.pending]
            self.s3.call(
                "complete_multipart_upload",
                f"completing the upload of {self.location}",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        self.part = bytearray()
        self.held = []
        self.store.fs.invalidate_cache(self.store.path)

    def abort(self) -> None:
        for _, future in self.pending:
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result()
        self.part = bytearray()
        self.held = []
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.s3.call(
                    "abort_multipart_upload",
                    f"aborting the upload of {self.location}",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                )


class _StreamSink(FileSink):
    """A file written through the filesystem's own buffered writer (non-S3 filesystems)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.file = fs.open(path, "wb")

    def write(self, buffers: Sequence[Buffer]) -> None:
        for buf in buffers:
            self.file.write(buf)

    def close(self) -> None:
        self.file.close()

    def abort(self) -> None:
        discard = getattr(self.file, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:
                discard()
            else:
                self.file.close()
        with contextlib.suppress(Exception):
            self.fs.rm_file(self.path)


def _spans(
    requests: Sequence[tuple[int, memoryview]], range_size: int, max_gap: int
) -> list[tuple[int, int, list[tuple[int, memoryview]]]]:
    """Group requests into ranged reads ``(start, end, pieces)`` of at most ``range_size``.

    Large requests are cut into several ranges (read concurrently); small
    neighbours share one range when the gap between them is small.
    """
    pieces = []
    for offset, request in sorted((r for r in requests if len(r[1])), key=lambda r: r[0]):
        buf = request.cast("B") if request.format != "B" else request  # ctypes views say "<B"
        for pos in range(0, len(buf), range_size):
            pieces.append((offset + pos, buf[pos : pos + range_size]))
    spans: list[tuple[int, int, list[tuple[int, memoryview]]]] = []
    for offset, buf in pieces:
        end = offset + len(buf)
        if spans:
            start, last_end, members = spans[-1]
            if 0 <= offset - last_end <= max_gap and end - start <= range_size:
                members.append((offset, buf))
                spans[-1] = (start, max(last_end, end), members)
                continue
        spans.append((offset, end, [(offset, buf)]))
    return spans


class FsspecStore(ByteStore):
    """The objects of one checkpoint "directory" on an fsspec filesystem."""

    def __init__(self, fs: Any, path: str, location: str, tuning: Tuning) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.location = location
        self.tuning = tuning
        self.read_segment_bytes = tuning.range_size * tuning.concurrency
        self.slots = threading.BoundedSemaphore(tuning.concurrency)
        self.s3 = _S3(fs, tuning.retry) if _is_s3(fs) else None

    def _path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        return self.tuning.retry.call(fn, what)

    def prepare(self) -> None:
        self._retry(lambda: self.fs.makedirs(self.path, exist_ok=True), f"preparing {self.location}")

    def create(self, name: str) -> FileSink:
        if self.s3 is not None:
            return _MultipartSink(self, self.s3, self._path(name), f"{self.location}/{name}")
        return _StreamSink(self.fs, self._path(name))

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        path = self._path(name)
        spans = _spans(requests, self.tuning.range_size, max_gap=256 * 1024)
        what = f"reading {self.location}/{name}"
        try:
            if getattr(self.fs, "async_impl", False):
                datas = self._fetch_concurrently(path, spans, what)
            else:
                datas = [
                    self._retry(functools.partial(self.fs.cat_file, path, start=s, end=e), what)
                    for s, e, _ in spans
                ]
        except StorageIOError as exc:
            if error_status(exc)[0] == 416:  # a range that starts past the end
                raise CorruptCheckpointError(f"{self.location}/{name} is truncated: {exc}") from exc
            raise
        for (start, end, members), data in zip(spans, datas, strict=True):
            if len(data) < end - start:
                raise CorruptCheckpointError(
                    f"{self.location}/{name} is truncated: asked for bytes {start}..{end}, "
                    f"got {len(data)} bytes"
                )
            view = memoryview(data)
            for offset, buf in members:
                buf[:] = view[offset - start : offset - start + len(buf)]

    def _fetch_concurrently(self, path: str, spans: list[Any], what: str) -> list[bytes]:
        from fsspec.asyn import sync

        retry = self.tuning.retry
        fs = self.fs

        async def fetch_all() -> list[bytes]:
            limit = asyncio.Semaphore(self.tuning.concurrency)

            async def fetch(start: int, end: int) -> bytes:
                async with limit:
                    data: bytes = await retry.acall(
                        lambda: fs._cat_file(path, start=start, end=end), f"{what} bytes {start}..{end}"
                    )
                    return data

            return list(await asyncio.gather(*(fetch(s, e) for s, e, _ in spans)))

        result: list[bytes] = sync(fs.loop, fetch_all)
        return result

    def read_file(self, name: str) -> bytes:
        data: bytes = self._retry(
            lambda: self.fs.cat_file(self._path(name), start=0), f"reading {self.location}/{name}"
        )
        return data

    def publish(self, name: str, data: bytes) -> None:
        self._retry(lambda: self.fs.pipe_file(self._path(name), data), f"writing {self.location}/{name}")
        self.fs.invalidate_cache(self.path)

    def list_files(self) -> list[str]:
        return [name for name, kind in self._list() if kind == "file"]

    def _list(self) -> list[tuple[str, str]]:
        try:
            entries = self._retry(
                lambda: self.fs.ls(self.path, detail=True, refresh=True), f"listing {self.location}"
            )
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [(e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"]) for e in entries]

    def delete_files(self, names: Sequence[str]) -> None:
        if not names:
            return
        if self.s3 is not None:
            bucket, key = self.s3.bucket_key(self.path)
            for i in range(0, len(names), 1000):  # S3 deletes at most 1000 keys a request
                objects = [{"Key": f"{key}/{n}" if key else n} for n in names[i : i + 1000]]
                self.s3.call(
                    "delete_objects",
                    f"deleting from {self.location}",
                    Bucket=bucket,
                    Delete={"Objects": objects, "Quiet": True},
                )
        else:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    self._retry(
                        functools.partial(self.fs.rm_file, self._path(name)),
                        f"deleting {self.location}/{name}",
                    )
        self.fs.invalidate_cache(self.path)

    def remove_location(self) -> None:
        if self.s3 is not None:
            return  # an object store has no directories to remove
        with contextlib.suppress(OSError, NotImplementedError):
            if self.fs.isdir(self.path) and not self.fs.ls(self.path, refresh=True):
                self.fs.rmdir(self.path)


class FsspecBackend(DirectoryBackend):
    """Checkpoints on any fsspec filesystem: S3, GCS, Azure, memory, and more.

    Storage options: ``part_size`` (bytes per uploaded part, default 16 MiB),
    ``multipart_threshold`` (larger files are multipart uploads, default
    32 MiB), ``range_size`` (bytes per ranged read, default 32 MiB), ``concurrency``
    (requests in flight per rank and direction, default 8),
    ``retry_attempts`` (default 5) and ``retry_delay`` (first backoff in
    seconds, default 0.2), ``thread_count`` (data files and threads per rank,
    default 8) and ``verify_checksums``; every
    other option goes to the fsspec filesystem (``endpoint_url``, ``key``,
    ``secret``, ``client_kwargs`` ... for s3fs).
    """

    schemes = (
        "s3",
        "s3a",
        "gs",
        "gcs",
        "az",
        "abfs",
        "abfss",
        "adl",
        "oss",
        "hdfs",
        "webhdfs",
        "sftp",
        "memory",
        "fsspec",
    )

    def __init__(
        self,
        *,
        thread_count: int | None = None,
        verify_checksums: bool = True,
        part_size: int = Tuning.part_size,
        multipart_threshold: int = Tuning.multipart_threshold,
        range_size: int = Tuning.range_size,
        concurrency: int = Tuning.concurrency,
        retry_attempts: int = RetryPolicy.attempts,
        retry_delay: float = RetryPolicy.base_delay,
        **fs_options: Any,
    ) -> None:
        super().__init__(thread_count=thread_count or _THREADS, verify_checksums=verify_checksums)
        if part_size < _MIN_PART:
            raise ValueError(f"part_size must be at least {_MIN_PART} bytes (S3's minimum), got {part_size}")
        if range_size < 1 or concurrency < 1:
            raise ValueError("range_size and concurrency must be positive")
        self.tuning = Tuning(
            part_size, multipart_threshold, range_size, concurrency, RetryPolicy(retry_attempts, retry_delay)
        )
        self.fs_options = fs_options

    def open_store(self, uri: str) -> FsspecStore:
        fs, path = open_filesystem(uri, self.fs_options)
        return FsspecStore(fs, path, uri.rstrip("/"), self.tuning)

    @classmethod
    def extra_storage_options(cls, uri: str) -> list[str]:
        """The options the fsspec filesystem for ``uri`` names in its constructors."""
        return filesystem_options(filesystem_class(uri))

    def child_names(self, prefix: str) -> list[str]:
        return [name for name, kind in self.open_store(prefix)._list() if kind == "directory"]


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register the fsspec backend for object stores and other fsspec filesystems."""
    register(FsspecBackend)
