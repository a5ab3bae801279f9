"""What the fsspec backend does itself on S3 (s3fs): multipart uploads whose parts go up
concurrently, ranged reads straight into their buffers, batched deletes, the multipart
uploads gc sees; every request through the store's retry policy, its adaptive limit on
requests in flight, its estimate of the link (the size of the next parts and ranges) and
its stall watchdog (:mod:`torchstow.backends.fsspec.pacing`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from torchstow.backends.fsspec.errors import is_throttling
from torchstow.backends.fsspec.pacing import (
    AdaptiveLimit,
    LinkEstimate,
    PartGate,
    Progress,
    ProgressBody,
    watch,
    watch_connections,
)
from torchstow.format.checksums import checksum as crc32c
from torchstow.spi import Buffer, FileSink

if TYPE_CHECKING:
    from torchstow.backends.fsspec.store import FsspecStore, Tuning


__all__ = ["MAX_PARTS", "MAX_REQUEST", "MIN_PART", "MultipartSink", "S3Requests"]

MiB = 1 << 20
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
MAX_REQUEST = 64 * MiB  # the largest part or range the measured link may ask for
_DELETE_BATCH = 1000  # S3 deletes at most 1000 keys a request
_READ_CHUNK = 1 << 20  # bytes per read of a response body (each one counts as progress)

T = TypeVar("T")


async def _chunks(stream: Any, progress: Progress) -> AsyncIterator[bytes]:
    """The chunks of a response body as they arrive, each one progress; the stream closed after."""
    progress.mark()
    try:
        while chunk := await stream.read(_READ_CHUNK):
            progress.mark()
            yield chunk
    finally:
        stream.close()


class S3Requests:
    """The S3 requests a store makes itself (s3fs's ``_call_s3``), all on the filesystem's
    event loop: each retried, as many in flight as the adaptive limit allows (chosen from
    the link's throughput, fewer while the store throttles, at most ``max_concurrency``),
    timed to estimate the link, and cancelled after ``stall_timeout`` seconds without
    progress."""

    def __init__(self, fs: Any, tuning: Tuning) -> None:
        watch_connections()
        self.fs = fs
        self._checksums: bool | None = None  # (see checksums: read once the client exists)
        self.retry = tuning.retry
        self.stall_timeout = tuning.stall_timeout
        self.limit = AdaptiveLimit(tuning.concurrency, tuning.start_concurrency)
        self.link = LinkEstimate()
        self.gate = PartGate(self.limit)
        self.files = itertools.count()  # the order of the files started, at the gate
        self._spare: dict[int, list[bytearray]] = {}  # part buffers to fill again, by size

    def request_size(self, base: int) -> int:
        """Bytes for the next part or range: ``base``, or more (up to :data:`MAX_REQUEST`)
        where the link's measured fixed cost and rate ask for it."""
        return self.link.request_size(base, MAX_REQUEST)

    def part_buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes for a part: one an earlier part gave back, or a new one
        (reusing them spares the page faults of fresh memory)."""
        try:
            return self._spare[size].pop()  # list.pop is atomic: threads may share the spares
        except (KeyError, IndexError):
            return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        """A part's buffer, no longer read by its upload."""
        spare = self._spare.setdefault(len(buffer), [])
        if len(spare) < self.limit.ceiling + self.gate.spare:
            spare.append(buffer)

    @property
    def checksums(self) -> bool:
        """Whether bodies carry a CRC32C: unless the client's config says to send a checksum
        only where an operation requires one (``request_checksum_calculation="when_required"``).
        Read from the client once it exists, then kept."""
        if self._checksums is None:
            config = getattr(getattr(getattr(self.fs, "s3", None), "meta", None), "config", None)
            if config is None:  # no client yet (s3fs makes it on the first request)
                return True
            self._checksums = getattr(config, "request_checksum_calculation", None) != "when_required"
        return self._checksums

    def upload_checksum(self) -> dict[str, str]:
        """What a multipart upload declares when it starts: its parts carry a CRC32C (the
        store then checks each part, and the completion lists them)."""
        return {"ChecksumAlgorithm": "CRC32C"} if self.checksums else {}

    def checksum(self, data: Buffer) -> dict[str, str]:
        """The CRC32C of a body, for the store to check, computed by the calling thread (a
        writer's, not the event loop that carries every request; the GIL is released) with
        the checkpoint's own checksum function (in hardware: a third of zlib's CRC32's
        time); the HTTP client then computes no checksum and signs no SHA-256 of the body."""
        if not self.checksums:
            return {}
        crc = base64.b64encode(crc32c(data).to_bytes(4, "big")).decode()
        return {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc}

    def put(self, bucket: str, key: str, body: Buffer, what: str, **kwargs: Any) -> None:
        """One object in a single PUT, with its CRC32C (retried, watched for stalls)."""
        self.call("put_object", what, Bucket=bucket, Key=key, Body=body, **self.checksum(body), **kwargs)

    async def request(
        self, method: str, what: str, *, on_attempt: Callable[[], None] | None = None, **kwargs: Any
    ) -> Any:
        """The response to one request, retried (``on_attempt`` runs before each try)."""
        body = kwargs.get("Body")
        size: int | None = len(body) if isinstance(body, bytes | bytearray | memoryview) else 0
        if method == "complete_multipart_upload":
            size = None  # its time is the store assembling the object, not the link's

        async def attempt() -> Any:
            if on_attempt is not None:
                on_attempt()
            return await self._attempt(what, lambda progress: self._send(method, kwargs, progress), size)

        return await self.retry.acall(attempt, what)

    async def _send(self, method: str, kwargs: dict[str, Any], progress: Progress) -> Any:
        body = kwargs.get("Body")
        if isinstance(body, bytes | bytearray | memoryview):
            kwargs = {**kwargs, "Body": ProgressBody(body, progress)}
        return await self.fs._call_s3(method, **kwargs)

    async def _attempt(
        self, what: str, send: Callable[[Progress], Awaitable[T]], size: int | Callable[[T], int] | None
    ) -> T:
        """One try of a request: within the limit, watched for stalls, timed for the link's
        estimate (``size``: the bytes it moves, how to read them from the result, or None
        for a request that says nothing of the link); throttling lowers the limit."""
        async with self.limit:
            progress = Progress()
            began = time.monotonic()
            try:
                result = await watch(send(progress), progress, self.stall_timeout, what)
            except Exception as exc:
                if is_throttling(exc):
                    self.limit.throttled(began)
                raise
            nbytes = size(result) if callable(size) else size
            if nbytes is not None:
                self.link.observe(nbytes, time.monotonic() - began)
        await self.limit.succeeded(nbytes or 0)
        return result

    def start(
        self, method: str, what: str, *, on_done: Callable[[], None], **kwargs: Any
    ) -> asyncio.Task[Any]:
        """Start a request as a task on the filesystem's event loop (see :meth:`results`,
        :meth:`cancel`); ``on_done`` runs when it ends, however it does."""

        async def create() -> asyncio.Task[Any]:
            task = asyncio.ensure_future(self.request(method, what, **kwargs))
            task.add_done_callback(lambda _: on_done())
            return task

        return asyncio.run_coroutine_threadsafe(create(), self.fs.loop).result()

    def results(self, tasks: Sequence[asyncio.Task[Any]]) -> list[Any]:
        """Wait for started requests: their responses, or the first one's error."""

        async def gather() -> list[Any]:
            return list(await asyncio.gather(*tasks))

        return asyncio.run_coroutine_threadsafe(gather(), self.fs.loop).result()

    def cancel(self, tasks: Sequence[asyncio.Task[Any]]) -> None:
        """Cancel started requests and wait until each has stopped (no byte of theirs still
        goes out once this returns)."""

        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.fs.loop).result()

    def call(self, method: str, what: str, **kwargs: Any) -> Any:
        """A request from outside the event loop: wait for its response."""
        return asyncio.run_coroutine_threadsafe(self.request(method, what, **kwargs), self.fs.loop).result()

    async def get_range(self, bucket: str, key: str, start: int, into: memoryview, what: str) -> int:
        """Read the object's bytes from ``start`` straight into ``into`` (a ranged GET, retried);
        the number of bytes the store had (fewer than asked when the object is shorter)."""

        async def send(progress: Progress) -> int:
            end = start + len(into) - 1
            response = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end}"
            )
            got = 0
            async for chunk in _chunks(response["Body"], progress):
                take = min(len(chunk), len(into) - got)
                into[got : got + take] = chunk if take == len(chunk) else memoryview(chunk)[:take]
                got += take
            return got

        return await self.retry.acall(lambda: self._attempt(what, send, lambda got: got), what)

    def read_object(self, bucket: str, key: str, what: str) -> bytes:
        """The whole object (a GET, retried, watched for stalls like any request)."""

        async def send(progress: Progress) -> bytes:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            return b"".join([chunk async for chunk in _chunks(response["Body"], progress)])

        coro = self.retry.acall(lambda: self._attempt(what, send, len), what)
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop).result()

    def list_dir(self, path: str, what: str) -> list[dict[str, Any]]:
        """What is right under ``path`` (a bucket, or a "directory" in it), every page, in
        s3fs's shape (``name``, ``type``, ``size``, S3's own fields of an object): one
        request a page, where s3fs's ``ls`` of an empty or missing prefix lists its parent too."""
        bucket, key = self.bucket_key(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        entries: list[dict[str, Any]] = []
        token: dict[str, str] = {}
        while True:
            listed = self.call("list_objects_v2", what, Bucket=bucket, Prefix=prefix, Delimiter="/", **token)
            entries += [
                {"name": f"{bucket}/{p['Prefix'].rstrip('/')}", "type": "directory", "size": 0}
                for p in listed.get("CommonPrefixes", [])
            ]
            entries += [
                {**o, "name": f"{bucket}/{o['Key']}", "type": "file", "size": o["Size"]}
                for o in listed.get("Contents", [])
                if o["Key"] != prefix  # a directory's marker object, not a file in it
            ]
            if not listed.get("IsTruncated"):
                return entries
            token = {"ContinuationToken": listed["NextContinuationToken"]}

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

    Bytes are copied once, into the part being filled (a buffer an earlier part
    gave back, when there is one); while no upload has started, full parts are
    held (a file that ends within the threshold is one PUT); past it, each full
    part is handed to the event loop while the next fills. The store's part gate
    bounds the parts filled or in flight and hands them out file by file; each
    new part is as large as the link asks for (:meth:`S3Requests.request_size`).
    """

    def __init__(self, store: FsspecStore, s3: S3Requests, path: str, location: str) -> None:
        self.store = store
        self.s3 = s3
        self.location = location
        self.bucket, self.key = s3.bucket_key(path)
        self.part_size = store.tuning.part_size
        self.threshold = store.tuning.multipart_threshold
        self.order = next(s3.files)  # atomic: writer threads start files at once
        self.part = s3.part_buffer(self.part_size)
        self.filled = 0
        self.held: list[bytearray] = []
        self.upload_id: str | None = None
        self.creates = 0  # create requests sent: more than one may leave a stray upload
        self.pending: list[asyncio.Task[Any]] = []  # the part uploads, part n at n - 1
        self.checksums: list[str | None] = []  # the CRC32C of part n at n - 1 (None: not sent)

    def write(self, buffers: Sequence[Buffer]) -> None:
        for buf in buffers:
            view = buf if isinstance(buf, memoryview) else memoryview(buf)
            pos = 0
            while pos < len(view):
                if self.filled == len(self.part):  # a full part, and more bytes follow
                    self._part_full()
                take = min(len(self.part) - self.filled, len(view) - pos)
                self.part[self.filled : self.filled + take] = view[pos : pos + take]
                self.filled += take
                pos += take

    def _part_full(self) -> None:
        if self.upload_id is None and sum(map(len, self.held)) + len(self.part) < self.threshold:
            self.held.append(self.part)  # the file may still end within one PUT
        else:
            for part in self.held:
                self._ship(part)
            self.held = []
            self._ship(self.part)
        adapt = self.store.tuning.adapt_parts
        self.part = self.s3.part_buffer(self.s3.request_size(self.part_size) if adapt else self.part_size)
        self.filled = 0

    def _ship(self, buffer: bytearray, size: int | None = None) -> None:
        """Upload ``buffer`` (its first ``size`` bytes) as the next part; the buffer goes back
        to the spares once its upload ends."""
        data = memoryview(buffer)[:size] if size is not None else buffer
        if self.upload_id is None:

            def created() -> None:
                self.creates += 1

            self.upload_id = self.s3.call(
                "create_multipart_upload",
                f"starting the upload of {self.location}",
                on_attempt=created,
                Bucket=self.bucket,
                Key=self.key,
                **self.s3.upload_checksum(),
            )["UploadId"]
        number = len(self.pending) + 1
        if number > MAX_PARTS:
            raise ValueError(
                f"{self.location} would need more than {MAX_PARTS} parts of {self.part_size} bytes; "
                "raise the part_size storage option"
            )
        for done in self.pending:  # fail fast if an earlier part failed for good
            if done.done() and not done.cancelled() and done.exception() is not None:
                done.result()
        checksum = self.s3.checksum(data)  # here, in the writer's thread, not on the event loop
        self.s3.gate.acquire(self.order)

        def sent() -> None:
            self.s3.gate.release()
            self.s3.give_back(buffer)

        task = self.s3.start(
            "upload_part",
            f"uploading part {number} of {self.location}",
            on_done=sent,
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
            **checksum,
        )
        self.pending.append(task)
        self.checksums.append(checksum.get("ChecksumCRC32C"))

    def close(self) -> None:
        # the last part may be short: a view of its bytes (a reused buffer is never resized,
        # a failed attempt of an earlier part may still view it)
        last = memoryview(self.part)[: self.filled]
        if self.upload_id is None:
            body = last if not self.held else bytearray().join([*self.held, last])
            self.s3.put(self.bucket, self.key, body, f"writing {self.location}")
        else:
            if self.filled:
                self._ship(self.part, self.filled)
            done = self.s3.results(self.pending)
            parts = [
                {"PartNumber": n, "ETag": r["ETag"], **({"ChecksumCRC32C": crc} if crc else {})}
                for n, (r, crc) in enumerate(zip(done, self.checksums, strict=True), start=1)
            ]
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
        with contextlib.suppress(Exception):
            self.s3.cancel(self.pending)
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
