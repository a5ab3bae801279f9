"""What the fsspec backend does itself on S3 (s3fs): multipart uploads whose parts go up
concurrently, batched deletes, every request through the store's retry policy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from torchstow.core.storage.retry import RetryPolicy
from torchstow.core.storage.store import Buffer, FileSink

if TYPE_CHECKING:
    from torchstow.backends.fsspec.store import FsspecStore


__all__ = ["MAX_PARTS", "MIN_PART", "MultipartSink", "S3Requests"]

MiB = 1 << 20
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
_DELETE_BATCH = 1000  # S3 deletes at most 1000 keys a request


class S3Requests:
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

    def delete_objects(self, path: str, names: Sequence[str], what: str) -> None:
        """Delete the objects ``names`` under ``path``, in batches of S3's maximum."""
        bucket, key = self.bucket_key(path)
        for i in range(0, len(names), _DELETE_BATCH):
            objects = [{"Key": f"{key}/{n}" if key else n} for n in names[i : i + _DELETE_BATCH]]
            self.call("delete_objects", what, Bucket=bucket, Delete={"Objects": objects, "Quiet": True})

    def _listed_uploads(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        """S3's records of the multipart uploads in progress under ``prefix``, every page."""
        found: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:
            listed = self.call(
                "list_multipart_uploads",
                f"listing the uploads under {bucket}/{prefix}",
                Bucket=bucket,
                Prefix=prefix,
                **markers,
            )
            found += listed.get("Uploads", [])
            if not listed.get("IsTruncated"):
                return found
            markers = {"KeyMarker": listed["NextKeyMarker"], "UploadIdMarker": listed["NextUploadIdMarker"]}

    def uploads(self, bucket: str, prefix: str) -> list[tuple[str, str, float]]:
        """``(key, upload id, last activity)`` of the multipart uploads in progress under
        ``prefix``: the later of its start and its newest part's arrival (an upload still
        gaining parts is alive, however long ago it started)."""
        return [
            (u["Key"], u["UploadId"], max([u["Initiated"].timestamp(), *self._part_times(bucket, u)]))
            for u in self._listed_uploads(bucket, prefix)
        ]

    def _part_times(self, bucket: str, upload: dict[str, Any]) -> list[float]:
        """When each part of ``upload`` arrived."""
        times: list[float] = []
        marker: dict[str, Any] = {}
        key = upload["Key"]
        while True:
            try:
                listed = self.call(
                    "list_parts",
                    f"listing the parts of {bucket}/{key}",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload["UploadId"],
                    **marker,
                )
            except FileNotFoundError:  # completed or aborted meanwhile
                return times
            times += [p["LastModified"].timestamp() for p in listed.get("Parts", [])]
            if not listed.get("IsTruncated"):
                return times
            marker = {"PartNumberMarker": listed["NextPartNumberMarker"]}

    def upload_ids(self, bucket: str, key: str) -> list[str]:
        """The ids of the multipart uploads in progress of the object ``key``."""
        return [u["UploadId"] for u in self._listed_uploads(bucket, key) if u["Key"] == key]

    def abort_upload(self, bucket: str, key: str, upload_id: str, location: str) -> None:
        """Abort one multipart upload (its parts are freed); one already gone is fine."""
        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: aborted or completed meanwhile
            self.call(
                "abort_multipart_upload",
                f"aborting the upload of {location}",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
            )

    def bucket_key(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key


class MultipartSink(FileSink):
    """An S3 object: one PUT up to the multipart threshold, else a multipart
    upload whose parts go up concurrently.

    Bytes are copied once, into the part being filled; while no upload has
    started, full parts are held (a file that ends within the threshold is
    one PUT); past it, each full part is handed to the event loop while the
    next fills. The store's semaphore bounds the parts in flight.
    """

    def __init__(self, store: FsspecStore, s3: S3Requests, path: str, location: str) -> None:
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
        self.creates = 0  # create requests sent: more than one may leave a stray upload
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

            def create() -> Any:
                self.creates += 1
                return self.s3.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)

            what = f"starting the upload of {self.location}"
            self.upload_id = self.s3.retry.call(create, what)["UploadId"]
        number = len(self.pending) + 1
        if number > MAX_PARTS:
            raise ValueError(
                f"{self.location} would need more than {MAX_PARTS} parts of {self.part_size} bytes; "
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
            if self.creates > 1:  # a create whose reply was lost started an upload nobody knows
                self._abort_uploads(keep=self.upload_id)
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
        if self.upload_id is not None or self.creates:
            with contextlib.suppress(Exception):
                self._abort_uploads(keep=None)

    def _abort_uploads(self, keep: str | None) -> None:
        """Abort the multipart uploads of this object but ``keep``: the object's name carries
        its save's id and rank, so every upload of it is this sink's."""
        ids = [self.upload_id] if self.creates <= 1 else self.s3.upload_ids(self.bucket, self.key)
        for upload_id in ids:
            if upload_id is not None and upload_id != keep:
                self.s3.abort_upload(self.bucket, self.key, upload_id, self.location)
