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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from torchstow.backends.fsspec.errors import is_throttling
from torchstow.backends.fsspec.pacing import (
    AdaptiveLimit,
    LinkEstimate,
    PartGate,
    Progress,
    ProgressBody,
    bytes_view,
    watch,
    watch_connections,
)
from torchstow.format.checksums import checksum as crc32c
from torchstow.spi import Buffer, FileSink, StorageIOError

if TYPE_CHECKING:
    from torchstow.backends.fsspec.store import FsspecStore, Tuning


__all__ = ["MAX_PARTS", "MAX_PUT", "MAX_REQUEST", "MIN_PART", "MultipartSink", "S3Requests"]

MiB = 1 << 20
MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
MAX_PUT = 5 << 30  # S3's largest single PUT, and largest part
MAX_REQUEST = 64 * MiB  # the largest part or range the measured link may ask for
_DELETE_BATCH = 1000  # S3 deletes at most 1000 keys a request
_READ_CHUNK = 1 << 20  # bytes per read of a response body (each one counts as progress)

SCRATCH = 1 << 20  # bytes of a scratch buffer that small pieces of a part are gathered into
GATHER_BELOW = 64 << 10  # pieces smaller than this are gathered; larger ones are sent as they are

T = TypeVar("T")
#: A request body: one buffer, or several sent one after the other (none copied).
Body = Buffer | Sequence[Buffer]


def _buffers(body: Any) -> list[memoryview] | None:
    """The buffers of a request body, as views (None: no body of bytes)."""
    if isinstance(body, bytes | bytearray | memoryview):
        return [memoryview(body)]
    if isinstance(body, list | tuple):
        return [memoryview(b) for b in body]
    return None


#: What S3 always puts in its reply to a request whose reply the store reads: an endpoint
#: that answers without it (a web server, a proxy's error page with status 200) is no S3.
_REPLY_FIELDS = {
    "create_multipart_upload": "UploadId",
    "upload_part": "ETag",
    "list_objects_v2": "IsTruncated",
    "list_multipart_uploads": "IsTruncated",
    "list_parts": "IsTruncated",
}


def _check_reply(method: str, reply: Any, what: str) -> None:
    """Raise StorageIOError where the reply to ``method`` lacks what S3 always sends."""
    field = _REPLY_FIELDS.get(method)
    if field is not None and (not isinstance(reply, dict) or field not in reply):
        raise StorageIOError(
            f"{what} failed: the endpoint's reply to {method} has no {field}, which S3 always sends "
            "(is it an S3 service? check the endpoint: endpoint_url, AWS_ENDPOINT_URL)"
        )


async def _chunks(stream: Any, progress: Progress) -> AsyncIterator[bytes]:
    """The chunks of a response body as they arrive, each one progress; the stream closed after."""
    progress.mark()
    try:
        while chunk := await stream.read(_READ_CHUNK):
            progress.mark()
            yield chunk
    finally:
        stream.close()


class ObjectsNotDeletedError(Exception):
    """The objects a DeleteObjects request's reply lists as not deleted; read by the retry
    policy as the first one's error (``response``, as botocore's errors carry it)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0]
        more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
        which = f"{len(errors)} object(s) not deleted: {first.get('Key')}{more}"
        super().__init__(f"{which} ({first.get('Code')}: {first.get('Message')})")
        message = f"{first.get('Message') or ''} ({which})".strip()
        self.response = {"Error": {"Code": first.get("Code"), "Message": message}}


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
        self.part_size = tuning.part_size
        self._spare: list[bytearray] = []  # scratch buffers to fill again (see scratch)

    def request_size(self, base: int) -> int:
        """Bytes for the next part or range: ``base``, or more (up to :data:`MAX_REQUEST`)
        where the link's measured fixed cost and rate ask for it."""
        return self.link.request_size(base, MAX_REQUEST)

    def scratch(self) -> bytearray:
        """A buffer of :data:`SCRATCH` bytes to gather small pieces into: one a finished part
        gave back, or a new one (reusing them spares the page faults of fresh memory)."""
        try:
            return self._spare.pop()  # list.pop is atomic: threads may share the spares
        except IndexError:
            return bytearray(SCRATCH)

    def give_back(self, buffers: Sequence[bytearray]) -> None:
        """Scratch buffers no longer read by their part's upload: kept for later parts, as
        many as the parts that may be filled or in flight could use at once."""
        keep = (self.limit.ceiling + self.gate.spare) * self.part_size // SCRATCH
        self._spare.extend(buffers[: max(0, keep - len(self._spare))])

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

    def checksum(self, body: Body) -> dict[str, str]:
        """The CRC32C of a body, for the store to check, computed by the calling thread (a
        writer's, not the event loop that carries every request; the GIL is released) with
        the checkpoint's own checksum function (in hardware: a third of zlib's CRC32's
        time); the HTTP client then computes no checksum and signs no SHA-256 of the body."""
        if not self.checksums:
            return {}
        crc = 0
        for buffer in _buffers(body) or []:
            crc = crc32c(buffer, crc)
        encoded = base64.b64encode(crc.to_bytes(4, "big")).decode()
        return {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": encoded}

    def put(self, bucket: str, key: str, body: Body, what: str, **kwargs: Any) -> None:
        """One object in a single PUT, with its CRC32C (retried, watched for stalls)."""
        done: Future[Any] = Future()
        self.send_put(done, bucket, key, body, what, **kwargs)
        done.result()

    def send_put(
        self, done: Future[Any], bucket: str, key: str, body: Body, what: str, **kwargs: Any
    ) -> None:
        """:meth:`put` sent with :meth:`send`."""
        fields: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": body, **self.checksum(body), **kwargs}
        self.send(done, "put_object", what, **fields)

    def send(self, done: Future[Any], method: str, what: str, **kwargs: Any) -> None:
        """:meth:`request` sent from outside the event loop, its response put in ``done``, a
        future the caller made (and kept) before sending: whatever interrupts the caller
        meanwhile (a signal handler raising), it can tell the request that never starts
        (``done.cancel()`` succeeds, and it never will) from one that started (wait for
        ``done``: what it did on the store, it did by then)."""

        async def send() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(await self.request(method, what, **kwargs))
            except BaseException as exc:
                done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        asyncio.run_coroutine_threadsafe(send(), self.fs.loop)

    async def request(
        self, method: str, what: str, *, on_attempt: Callable[[], None] | None = None, **kwargs: Any
    ) -> Any:
        """The response to one request, retried (``on_attempt`` runs before each try)."""
        buffers = _buffers(kwargs.get("Body"))
        size: int | None = sum(b.nbytes for b in buffers) if buffers is not None else 0
        if method == "complete_multipart_upload":
            size = None  # its time is the store assembling the object, not the link's

        async def attempt() -> Any:
            if on_attempt is not None:
                on_attempt()
            return await self._attempt(what, lambda progress: self._send(method, kwargs, progress), size)

        reply = await self.retry.acall(attempt, what)
        _check_reply(method, reply, what)
        return reply

    async def _send(self, method: str, kwargs: dict[str, Any], progress: Progress) -> Any:
        buffers = _buffers(kwargs.get("Body"))
        if buffers is not None:
            kwargs = {**kwargs, "Body": ProgressBody(buffers, progress)}
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
        self,
        tasks: list[asyncio.Task[Any]],
        method: str,
        what: str,
        *,
        on_done: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        """Start a request as a task on the filesystem's event loop, appended to ``tasks`` there
        (see :meth:`results`, :meth:`cancel`: a caller interrupted before this returns still
        finds it in ``tasks`` once its own later call reaches the loop); ``on_done`` runs when
        it ends, however it does."""

        async def create() -> None:
            task = asyncio.ensure_future(self.request(method, what, **kwargs))
            task.add_done_callback(lambda _: on_done())
            tasks.append(task)

        asyncio.run_coroutine_threadsafe(create(), self.fs.loop).result()

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

    @staticmethod
    async def all_or_none(requests: Iterable[Awaitable[T]]) -> list[T]:
        """The results of ``requests`` run together, or the first one's error once every other
        has been cancelled and has stopped (a read that failed or was cancelled leaves none
        writing into its caller's buffers)."""
        tasks = [asyncio.ensure_future(r) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the event loop and wait for its result. A wait interrupted (a signal
        handler raising in this thread) cancels it and waits until it has stopped, so that
        nothing it started still acts once this raises (a second interrupt skips that wait)."""
        tasks: list[asyncio.Task[Any]] = []

        async def create() -> None:
            tasks.append(asyncio.ensure_future(coro))

        try:
            asyncio.run_coroutine_threadsafe(create(), self.fs.loop)  # runs before either call below
            result: T = self.results(tasks)[0]
        except BaseException:
            with contextlib.suppress(Exception):
                self.cancel(tasks)
            raise
        return result

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

    def read_object(self, bucket: str, key: str, what: str, limit: int | None = None) -> bytes | None:
        """The whole object (a GET, retried, watched for stalls like any request); None,
        its body left unread, where the reply's ``Content-Length`` is more than ``limit``."""

        async def send(progress: Progress) -> bytes | None:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            if limit is not None and response.get("ContentLength", 0) > limit:
                response["Body"].close()
                return None
            return b"".join([chunk async for chunk in _chunks(response["Body"], progress)])

        coro = self.retry.acall(lambda: self._attempt(what, send, lambda data: len(data or b"")), what)
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
        """Delete the objects ``names`` under ``path``, in batches of S3's maximum. S3 answers
        a batch 200 however many of its objects it failed to delete, listing those: they are
        sent again as a retry (a transient code) or raised (StorageIOError); one already gone
        is no failure."""
        bucket, key = self.bucket_key(path)
        for i in range(0, len(names), _DELETE_BATCH):
            keys = [f"{key}/{n}" if key else n for n in names[i : i + _DELETE_BATCH]]

            async def attempt(batch: list[str] = keys) -> None:
                objects = [{"Key": k} for k in batch]
                fields = {"Bucket": bucket, "Delete": {"Objects": objects, "Quiet": True}}
                reply = await self._attempt(
                    what, lambda progress: self._send("delete_objects", fields, progress), 0
                )
                failed = [e for e in reply.get("Errors", []) if e.get("Code") != "NoSuchKey"]
                if failed:
                    batch[:] = [e["Key"] for e in failed]  # what the next attempt sends
                    raise ObjectsNotDeletedError(failed)

            asyncio.run_coroutine_threadsafe(self.retry.acall(attempt, what), self.fs.loop).result()

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


class _Part:
    """The bytes of one part (or of a whole object sent in one PUT): views of the buffers
    the writer gave, in order, none copied, but pieces smaller than :data:`GATHER_BELOW`
    (padding, small tensors), which are gathered into scratch buffers (see
    :meth:`S3Requests.scratch`) so that the part is not sent in thousands of small writes."""

    def __init__(self, target: int) -> None:
        self.target = target  # bytes it will hold (the last part of a file: fewer)
        self.size = 0
        self.views: list[memoryview] = []
        self.scratch: list[bytearray] = []  # the scratch buffers its small pieces are in
        self._gathered = 0  # bytes of the last scratch buffer in use
        self._viewed = 0  # of which its views show so far

    def add(self, piece: memoryview, s3: S3Requests) -> None:
        self.size += len(piece)
        if len(piece) >= GATHER_BELOW:
            self._seal()
            self.views.append(piece)
            return
        while len(piece):
            if not self.scratch or self._gathered == SCRATCH:
                self._seal()
                self.scratch.append(s3.scratch())
                self._gathered = self._viewed = 0
            n = min(len(piece), SCRATCH - self._gathered)
            self.scratch[-1][self._gathered : self._gathered + n] = piece[:n]
            self._gathered += n
            piece = piece[n:]

    def body(self) -> list[memoryview]:
        """Its bytes, as the views to send."""
        self._seal()
        return self.views

    def _seal(self) -> None:
        """End the view of the bytes gathered since the last one (larger pieces follow)."""
        if self._gathered > self._viewed:
            self.views.append(memoryview(self.scratch[-1])[self._viewed : self._gathered])
            self._viewed = self._gathered


class MultipartSink(FileSink):
    """An S3 object: one PUT up to the multipart threshold, else a multipart
    upload whose parts go up concurrently.

    A tensor's bytes are not copied: a part is the views of the writer's buffers that it
    spans, sent as they are (the views keep their memory alive; see
    :func:`~torchstow.format.buffers.tensor_bytes`), but for small pieces gathered into
    reused scratch buffers (:class:`_Part`). While no upload has started, full parts are
    held (a file that ends within the threshold is one PUT); past it, each full part is
    handed to the event loop while the next fills. The store's part gate bounds the parts
    filled or in flight and hands them out file by file; each new part is as large as the
    link asks for (:meth:`S3Requests.request_size`).
    """

    def __init__(self, store: FsspecStore, s3: S3Requests, path: str, location: str) -> None:
        self.store = store
        self.s3 = s3
        self.location = location
        self.bucket, self.key = s3.bucket_key(path)
        self.part_size = store.tuning.part_size
        self.threshold = store.tuning.multipart_threshold
        self.order = next(s3.files)  # atomic: writer threads start files at once
        self.part = _Part(self.part_size)
        self.held: list[_Part] = []
        self.upload_id: str | None = None
        self.creates = 0  # create requests sent: more than one may leave a stray upload
        self.pending: list[asyncio.Task[Any]] = []  # the part uploads, part n at n - 1
        self.checksums: list[str | None] = []  # the CRC32C of part n at n - 1 (None: not sent)
        self.put: Future[Any] | None = None  # the single PUT, once sent
        self.create: Future[Any] | None = None  # the request starting the multipart upload, once sent

    def write(self, buffers: Sequence[Buffer]) -> None:
        for buf in buffers:
            view = bytes_view(buf)
            pos = 0
            while pos < len(view):
                if self.part.size == self.part.target:  # a full part, and more bytes follow
                    self._part_full()
                take = min(self.part.target - self.part.size, len(view) - pos)
                self.part.add(view[pos : pos + take], self.s3)
                pos += take

    def _part_full(self) -> None:
        if self.upload_id is None and sum(p.size for p in self.held) + self.part.size < self.threshold:
            self.held.append(self.part)  # the file may still end within one PUT
        else:
            for part in self.held:
                self._ship(part)
            self.held = []
            self._ship(self.part)
        adapt = self.store.tuning.adapt_parts
        self.part = _Part(self.s3.request_size(self.part_size) if adapt else self.part_size)

    def _ship(self, part: _Part) -> None:
        """Upload ``part`` as the next part; its scratch buffers go back to the spares once
        its upload ends."""
        if self.upload_id is None:

            def created() -> None:
                self.creates += 1

            self.create = Future()  # kept before the request can start: a handler may raise at any point
            self.s3.send(
                self.create,
                "create_multipart_upload",
                f"starting the upload of {self.location}",
                on_attempt=created,
                Bucket=self.bucket,
                Key=self.key,
                **self.s3.upload_checksum(),
            )
            self.upload_id = self.create.result()["UploadId"]
        number = len(self.pending) + 1
        if number > MAX_PARTS:
            raise ValueError(
                f"{self.location} would need more than {MAX_PARTS} parts of {self.part_size} bytes; "
                "raise the part_size storage option"
            )
        for done in self.pending:  # fail fast if an earlier part failed for good
            if done.done() and not done.cancelled() and done.exception() is not None:
                done.result()
        body = part.body()
        checksum = self.s3.checksum(body)  # here, in the writer's thread, not on the event loop
        self.s3.gate.acquire(self.order)

        def sent() -> None:
            self.s3.gate.release()
            self.s3.give_back(part.scratch)

        self.s3.start(
            self.pending,
            "upload_part",
            f"uploading part {number} of {self.location}",
            on_done=sent,
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,
            **checksum,
        )
        self.checksums.append(checksum.get("ChecksumCRC32C"))

    def close(self) -> None:
        if self.upload_id is None:
            body = [view for part in [*self.held, self.part] for view in part.body()]
            self.put = Future()  # kept before the PUT can start: a handler may raise at any point
            self.s3.send_put(self.put, self.bucket, self.key, body, f"writing {self.location}")
            self.put.result()
            self.s3.give_back([b for part in [*self.held, self.part] for b in part.scratch])
        else:
            if self.part.size:
                self._ship(self.part)
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
        self._forget()
        self.store.fs.invalidate_cache(self.store.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.s3.cancel(self.pending)
        for request in (self.put, self.create):
            # a single PUT, or the request starting the multipart upload, whose wait was
            # interrupted (a signal handler raised) after it started: let it end, so that what
            # it does on the store (an object, an upload) is done before the cleanup below and
            # the failed save's undo it; cancelled once sent, it could still be done after
            if request is not None and not request.cancel():
                with contextlib.suppress(Exception):
                    request.result()
        self._forget()
        if self.creates:  # (its upload's id known or not: see _abort_uploads)
            with contextlib.suppress(Exception):
                self._abort_uploads(keep=None)

    def _abort_uploads(self, keep: str | None) -> None:
        """Abort the multipart uploads of this object but ``keep``: the object's name carries
        its save's id and rank, so every upload of it is this sink's. Listed unless the one
        create request sent returned its upload's id (a create retried, or interrupted or failed
        after the store may have acted on it, may have started uploads nobody knows)."""
        known = self.creates == 1 and self.upload_id is not None
        ids = [self.upload_id] if known else self.s3.upload_ids(self.bucket, self.key)
        for upload_id in ids:
            if upload_id is not None and upload_id != keep:
                self.s3.abort_upload(self.bucket, self.key, upload_id, self.location)

    def _forget(self) -> None:
        """Drop every view of the writer's buffers (the tensors they keep alive) and the
        finished uploads' requests."""
        self.part = _Part(0)
        self.held = []
        self.pending = []
        self.put = None
