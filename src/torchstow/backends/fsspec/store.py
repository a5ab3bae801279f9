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
import datetime
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torchstow.backends.fsspec.errors import CloudRetryPolicy, error_status
from torchstow.backends.fsspec.filesystems import (
    is_s3,
)
from torchstow.backends.fsspec.s3 import MAX_REQUEST, MultipartSink, S3Requests
from torchstow.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchstow.format.files import temporary_name
from torchstow.spi import Buffer, ByteStore, FileSink, PendingUpload, RetryPolicy, StorageIOError

__all__ = ["FsspecStore", "Tuning"]

logger = logging.getLogger(__name__)

MiB = 1 << 20
# Data files (and threads) per rank: remote stores gain from several objects in
# flight, and the threads mostly wait on the network.
THREADS = 8


@dataclass(frozen=True)
class Tuning:
    """How a store moves bytes: part and range sizes, requests in flight, retries.

    ``concurrency`` is the most requests in flight, ``start_concurrency`` where the adaptive
    limit begins (equal when the user chose it); ``adapt_parts`` and ``adapt_ranges`` say
    whether the measured link may make parts and ranges larger than ``part_size`` and
    ``range_size`` (not where the user set them)."""

    part_size: int = 16 * MiB
    multipart_threshold: int = 32 * MiB
    range_size: int = 16 * MiB
    concurrency: int = 32
    retry: RetryPolicy = field(default_factory=CloudRetryPolicy)
    stall_timeout: float = 60.0
    start_concurrency: int = 16
    adapt_parts: bool = True
    adapt_ranges: bool = True


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
        """Throw the file away: discarded where its filesystem can (and then marked closed:
        a buffered remote file, gcsfs's or adlfs's, closed by its finalizer later would upload
        what it holds), else closed; then removed."""
        discarded = False
        with contextlib.suppress(Exception):
            self.file.discard()  # (fsspec's local files refuse, unless written to a temporary file)
            discarded = True
        if discarded:
            with contextlib.suppress(Exception):
                self.file.closed = True
        else:
            with contextlib.suppress(Exception):
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


def _is_local(fs: Any) -> bool:
    """Whether ``fs`` is fsspec's local filesystem (``fsspec+file://``), whose ``mv`` is a rename."""
    protocol = fs.protocol
    return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


def _name(entry: dict[str, Any]) -> str:
    """The last part of a listed entry's path."""
    name: str = entry["name"].rstrip("/").rsplit("/", 1)[-1]
    return name


class FsspecStore(ByteStore):
    """The objects of one checkpoint "directory" on an fsspec filesystem."""

    def __init__(self, fs: Any, path: str, location: str, tuning: Tuning) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.location = location
        self.tuning = tuning
        largest = MAX_REQUEST if tuning.adapt_ranges else tuning.range_size
        self.read_segment_bytes = largest * tuning.concurrency
        self.s3 = S3Requests(fs, tuning) if is_s3(fs) else None

    def _path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def _retry(self, fn: Callable[[], Any], what: str) -> Any:
        return self.tuning.retry.call(fn, what)

    def prepare(self) -> None:
        what = f"preparing {self.location}"
        if (
            self.s3 is not None
        ):  # one watched request when the bucket is there (s3fs's makedirs makes several)
            bucket, _ = self.s3.bucket_key(self.path)
            try:
                self.s3.call("head_bucket", what, Bucket=bucket)
                return
            except PermissionError:  # may not look, may still write: the writes will tell
                return
            except FileNotFoundError:
                pass  # s3fs creates it, in the client's region
        self._retry(lambda: self.fs.makedirs(self.path, exist_ok=True), what)

    def create(self, name: str) -> FileSink:
        if self.s3 is not None:
            return MultipartSink(self, self.s3, self._path(name), f"{self.location}/{name}")
        return _StreamSink(self.fs, self._path(name))

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        path = self._path(name)
        range_size = self.tuning.range_size
        if self.s3 is not None and self.tuning.adapt_ranges:
            range_size = self.s3.request_size(range_size)
        spans = _spans(requests, range_size, max_gap=256 * 1024)
        what = f"reading {self.location}/{name}"
        try:
            if self.s3 is not None:
                self._read_s3(path, spans, what)
                return
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

    def _read_s3(self, path: str, spans: list[Any], what: str) -> None:
        """Ranged GETs in parallel, each straight into its buffer when one buffer is the whole
        range (else into a scratch buffer, then to the pieces); once this returns or raises,
        however, none writes into a buffer any more."""
        assert self.s3 is not None
        s3 = self.s3
        bucket, key = s3.bucket_key(path)
        targets = [
            members[0][1]
            if len(members) == 1 and len(members[0][1]) == end - start
            else memoryview(bytearray(end - start))
            for start, end, members in spans
        ]

        got: list[int] = s3.run(
            s3.all_or_none(
                s3.get_range(bucket, key, start, into, f"{what} bytes {start}..{end}")
                for (start, end, _), into in zip(spans, targets, strict=True)
            )
        )
        name = path.rsplit("/", 1)[-1]
        for (start, end, members), into, n in zip(spans, targets, got, strict=True):
            if n < end - start:
                raise CorruptCheckpointError(
                    f"{self.location}/{name} is truncated: asked for bytes {start}..{end}, got {n} bytes"
                )
            if len(members) > 1 or members[0][1] is not into:
                for offset, buf in members:
                    buf[:] = into[offset - start : offset - start + len(buf)]

    def _fetch_concurrently(self, path: str, spans: list[Any], what: str) -> list[bytes]:
        from fsspec.asyn import sync

        retry = self.tuning.retry
        fs = self.fs

        async def fetch_all() -> list[bytes]:
            limit = asyncio.Semaphore(self.tuning.start_concurrency)

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
        what = f"reading {self.location}/{name}"
        if self.s3 is not None:  # a plain GET: no listing cache in the way, watched for stalls
            bucket, key = self.s3.bucket_key(self._path(name))
            whole = self.s3.read_object(bucket, key, what)
            assert whole is not None  # (None only over a limit)
            return whole
        # A whole-file read may take the size from the listing cache, which another
        # process's writes since this process listed the location have made stale.
        self.fs.invalidate_cache(self._path(name))
        data: bytes = self._retry(lambda: self.fs.cat_file(self._path(name)), what)
        return data

    def read_small_file(self, name: str, limit: int) -> bytes | None:
        """On S3 one GET, its body left unread where its ``Content-Length`` is over ``limit``;
        elsewhere the default (the size from the listing first)."""
        if self.s3 is None:
            return super().read_small_file(name, limit)
        bucket, key = self.s3.bucket_key(self._path(name))
        return self.s3.read_object(bucket, key, f"reading {self.location}/{name}", limit)

    def publish(self, name: str, data: bytes) -> None:
        """One PUT on S3 (atomic); on a local filesystem a temporary file renamed over
        ``name`` (written in place, a write cut short would leave a torn manifest where the
        replaced checkpoint's stood); elsewhere the filesystem's own whole-file write."""
        what = f"writing {self.location}/{name}"
        if self.s3 is not None:
            bucket, key = self.s3.bucket_key(self._path(name))
            self.s3.put(bucket, key, data, what)
        elif _is_local(self.fs):
            tmp = self._path(temporary_name(name, uuid.uuid4().hex[:8]))
            try:
                self._retry(lambda: self.fs.pipe_file(tmp, data), what)
                self._retry(lambda: self.fs.mv(tmp, self._path(name)), what)  # os.rename: atomic
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(tmp)
                raise
        else:
            self._retry(lambda: self.fs.pipe_file(self._path(name), data), what)
        self.fs.invalidate_cache(self.path)

    def publish_new(self, name: str, data: bytes) -> None:
        """Exclusive on S3: a conditional PUT (``If-None-Match: *``), which the
        store refuses with 412 when the object exists. Elsewhere, and on S3
        servers that do not implement conditional writes (501), the
        store's check-then-write fallback (not exclusive)."""
        if self.s3 is None:
            super().publish_new(name, data)
            return
        bucket, key = self.s3.bucket_key(self._path(name))
        try:
            self.s3.put(bucket, key, data, f"writing {self.location}/{name}", IfNoneMatch="*")
        except StorageIOError as exc:
            status, code = error_status(exc)
            if status == 412 or code == "PreconditionFailed":
                raise FileExistsError(f"{self.location}/{name} exists") from exc
            if status != 501 and code != "NotImplemented":
                raise
            logger.warning(
                "%s does not support conditional writes; committing without exclusion", self.location
            )
            super().publish_new(name, data)
        finally:
            self.fs.invalidate_cache(self.path)

    def list_files(self) -> list[str]:
        return [name for name, kind, _ in self._list() if kind == "file"]

    def file_sizes(self) -> dict[str, int]:
        return {name: size for name, kind, size in self._list() if kind == "file" and isinstance(size, int)}

    def file_times(self) -> dict[str, float] | None:
        """From the listing: S3's ``LastModified``, or the ``mtime``/``updated``/``created``
        other filesystems give (a number, a datetime or ISO 8601 text); None when the
        filesystem gives none of them."""
        times = {}
        for e in self._entries():
            if e["type"] != "file":
                continue
            stamp = e.get("LastModified") or e.get("mtime") or e.get("updated") or e.get("created")
            if isinstance(stamp, str):
                with contextlib.suppress(ValueError):
                    stamp = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            if isinstance(stamp, datetime.datetime):
                stamp = stamp.timestamp()
            if not isinstance(stamp, int | float):
                return None
            times[_name(e)] = float(stamp)
        return times

    def pending_uploads(self) -> list[PendingUpload]:
        if self.s3 is None:
            return []
        bucket, key = self.s3.bucket_key(self.path)
        prefix = f"{key}/" if key else ""
        return [
            PendingUpload(name[len(prefix) :], upload_id, started)
            for name, upload_id, started in self.s3.uploads(bucket, prefix)
        ]

    def abort_upload(self, upload: PendingUpload) -> None:
        if self.s3 is None:
            super().abort_upload(upload)
            return
        bucket, key = self.s3.bucket_key(self._path(upload.name))
        self.s3.abort_upload(bucket, key, upload.upload_id, f"{self.location}/{upload.name}")

    def _list(self, *, bucket_must_exist: bool = False) -> list[tuple[str, str, Any]]:
        """``(name, kind, size)`` of what is at the location; [] where nothing is, or, unless
        ``bucket_must_exist``, where its bucket is missing (a save creates it)."""
        return [
            (_name(e), e["type"], e.get("size")) for e in self._entries(bucket_must_exist=bucket_must_exist)
        ]

    def _entries(self, *, bucket_must_exist: bool = False) -> list[dict[str, Any]]:
        """The filesystem's detailed listing of the location (see :meth:`_list`)."""
        what = f"listing {self.location}"
        try:
            entries: list[dict[str, Any]] = (
                self.s3.list_dir(self.path, what)
                if self.s3 is not None
                else self._retry(lambda: self.fs.ls(self.path, detail=True, refresh=True), what)
            )
        except (FileNotFoundError, NotADirectoryError) as exc:
            if bucket_must_exist and error_status(exc)[1] == "NoSuchBucket":
                bucket = self.path.split("/", 1)[0]
                raise CheckpointNotFoundError(
                    f"{self.location}: the bucket {bucket!r} does not exist"
                ) from exc
            return []
        return entries

    def delete_files(self, names: Sequence[str]) -> None:
        if not names:
            return
        if self.s3 is not None:
            self.s3.delete_objects(self.path, names, f"deleting from {self.location}")
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
