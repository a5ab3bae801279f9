"""Keeping S3 requests moving: an adaptive limit on requests in flight (raised while the
link's throughput grows, halved when the store throttles, then regained), what the first
requests tell of the link (a request's fixed cost, one connection's rate: the size of the
next parts and ranges), a gate that hands the writer threads their parts file by file, and
a watchdog that cancels a request which makes no progress for ``stall_timeout`` seconds,
so the retry policy sends it again instead of waiting on a dead connection.

Progress is bytes moving, however long the request takes: a byte received, a byte of a body
handed to the HTTP client, and, once the client has handed a body to its connection (the
kernel's send buffer holds megabytes, which a slow link takes seconds to drain), each fall
of the bytes still unsent on that connection (:meth:`Progress.sample`)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import heapq
import io
import itertools
import logging
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar, cast

__all__ = [
    "AdaptiveLimit",
    "LinkEstimate",
    "PartGate",
    "Progress",
    "ProgressBody",
    "StallError",
    "bytes_view",
    "watch",
    "watch_connections",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_SEND_CHUNK = 256 << 10  # bytes of a body handed to the connection at a time


class StallError(TimeoutError):
    """A request made no progress for ``stall_timeout`` seconds and was cancelled (transient)."""


class Progress:
    """When a request last moved a byte (or started); once its body's connection is known
    (:meth:`sending_on`), also the bytes still unsent there, whose every fall is progress."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.transport: asyncio.BaseTransport | None = None
        self.unsent: int | None = None

    def mark(self) -> None:
        self.at = time.monotonic()

    def sending_on(self, transport: asyncio.BaseTransport | None) -> None:
        """The HTTP client writes the body to ``transport``: watch the bytes left unsent there."""
        self.transport = transport
        self.unsent = None

    def sample(self) -> None:
        """Mark progress if fewer bytes wait unsent on the body's connection than at the last sample."""
        if self.transport is None:
            return
        unsent = _unsent(self.transport)
        if unsent is not None and self.unsent is not None and unsent < self.unsent:
            self.mark()
        self.unsent = unsent

    def drop_connection(self) -> None:
        """The request was given up: close its body's connection at once, dropping the bytes it
        holds unsent. Closed gracefully (as the HTTP client closes a cancelled request's), it
        would send them whenever the peer reads again, and from Python 3.12 on they are views of
        the body's own memory (a tensor's, a scratch buffer's), which may be reused by then."""
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()


def _unsent(transport: asyncio.BaseTransport) -> int | None:
    """Bytes written to ``transport`` that have not left the host yet: its own buffer and, on
    Linux, the socket's send queue (bytes the peer has not acknowledged); None once closed."""
    if transport.is_closing():
        return None
    unsent = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
    sock = transport.get_extra_info("socket")
    if sock is not None and _OUTQ is not None:
        with contextlib.suppress(OSError, ValueError):
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
    return unsent


if sys.platform == "linux":
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ  # SIOCOUTQ on a TCP socket
else:  # elsewhere only the transport's own buffer is seen: a slow link's last megabytes are not
    _OUTQ = None


@functools.cache
def watch_connections() -> None:
    """Tell aiohttp to hand each :class:`ProgressBody`'s progress the connection it is written
    to (a payload type of its own, else aiohttp's for any file object), so the watchdog sees
    the body's bytes leave the host, not only reach the client, and judges that request
    alone (without the client's read timeout). Once per process."""
    from aiohttp import payload

    class _WatchedBody(payload.IOBasePayload):
        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            body = cast(ProgressBody, self._value)  # aiobotocore's proxy of it
            body.progress.sending_on(getattr(writer, "transport", None))
            protocol = getattr(writer, "protocol", None)
            if protocol is not None and hasattr(protocol, "read_timeout"):
                # the client's read timeout starts once the body is handed over, before a slow
                # link has sent its last megabytes: the watchdog alone judges this request
                protocol.read_timeout = None
            # read on the event loop, not through the thread pool as aiohttp reads any file:
            # the body's reads are slices of memory (no I/O), and a pool thread's round trip
            # for each 64 KiB cost more CPU than sending the bytes
            self._set_or_restore_start_position()
            left = content_length
            while left is None or left > 0:
                chunk = body.read(_SEND_CHUNK if left is None else min(_SEND_CHUNK, left))
                if not chunk:
                    return
                await writer.write(chunk)
                if left is not None:
                    left -= len(chunk)

    payload.PAYLOAD_REGISTRY.register(_WatchedBody, ProgressBody, order=payload.Order.try_first)


class ProgressBody(io.RawIOBase):
    """A request body of ``buffers``, one after the other, without copying them (each read
    is a view of one of them), marking ``progress`` as the HTTP client reads it (it reads
    ahead of the socket by as much as the kernel's send buffer holds:
    :func:`watch_connections` shows the bytes leave)."""

    def __init__(self, buffers: Sequence[memoryview | bytes | bytearray], progress: Progress) -> None:
        super().__init__()
        self.buffers = [view for view in map(bytes_view, buffers) if len(view)]
        self.starts = list(itertools.accumulate(map(len, self.buffers), initial=0))
        self.pos = 0
        self.progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = bytes_view(buffer)
        n = 0
        while n < len(out) and (chunk := self.read(len(out) - n)):
            out[n : n + len(chunk)] = chunk
            n += len(chunk)
        return n

    def read(self, size: int | None = -1) -> memoryview | bytes:
        """The next bytes: a view of one buffer, at most ``size`` of them (no copy: the HTTP
        client hands it to the socket); all that is left for a negative ``size``."""
        if size is None or size < 0:
            rest = []
            while chunk := self.read(len(self)):  # the rest of one buffer at a time
                rest.append(chunk)
            return b"".join(rest)
        index = bisect.bisect_right(self.starts, self.pos) - 1
        if index >= len(self.buffers):
            return b""
        start = self.pos - self.starts[index]
        chunk = self.buffers[index][start : start + size]
        self.pos += len(chunk)
        self.progress.mark()
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return self.starts[-1]


def bytes_view(buffer: Any) -> memoryview:
    """``buffer`` as a flat view of bytes (format ``B``; ctypes views say ``<B``), no copy."""
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


async def watch(request: Awaitable[T], progress: Progress, stall_timeout: float, what: str) -> T:
    """Await ``request``; cancel it and raise :class:`StallError` once ``progress`` has not
    moved for ``stall_timeout`` seconds (its body's connection is sampled :data:`_SAMPLES`
    times per ``stall_timeout``). A request cancelled here, or with the caller, has its body's
    connection dropped (:meth:`Progress.drop_connection`)."""
    task = asyncio.ensure_future(request)
    try:
        while True:
            progress.sample()
            left = progress.at + stall_timeout - time.monotonic()
            if left <= 0:
                task.cancel()
                raise StallError(
                    f"no progress for {stall_timeout:g}s (stall_timeout); the request was cancelled"
                )
            done, _ = await asyncio.wait({task}, timeout=min(left, stall_timeout / _SAMPLES))
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            progress.drop_connection()


_SAMPLES = 8


class LinkEstimate:
    """What the first requests tell of the link: the fixed cost of a request (``overhead``:
    seconds of one that moves almost no bytes, a round trip and the server's turn) and the
    bytes per second one connection moves (``rate``), each a moving average."""

    def __init__(self) -> None:
        self.overhead: float | None = None
        self.rate: float | None = None

    def observe(self, nbytes: int, seconds: float) -> None:
        """A request that moved ``nbytes`` in ``seconds``, from send to last byte."""
        if nbytes < _DATA_REQUEST:
            self.overhead = _average(self.overhead, seconds)
        else:
            moving = max(seconds - (self.overhead or 0.0), seconds / 2)
            self.rate = _average(self.rate, nbytes / moving)

    def request_size(self, base: int, most: int) -> int:
        """Bytes per data request so the fixed cost is at most 1/16 of a request's time:
        ``16 * overhead * rate``, rounded up to a MiB, between ``base`` and ``most``
        (``base`` until both are measured)."""
        if self.overhead is None or self.rate is None:
            return base
        want = 16 * self.overhead * self.rate
        return int(min(most, max(base, -(-want // _MiB) * _MiB)))


_MiB = 1 << 20
_DATA_REQUEST = _MiB  # a request moving fewer bytes measures the overhead, more the rate


def _average(old: float | None, new: float) -> float:
    return new if old is None else 0.75 * old + 0.25 * new


class AdaptiveLimit:
    """At most ``limit`` requests in flight, between 1 and ``ceiling``, starting at ``start``.

    Chosen from the link while requests run: each round of ``limit`` completed requests that
    moved data is an epoch (one begun while nothing was in flight starts afresh; requests
    that moved none, such as the uploads' starts, are not counted: ending a round, they
    made the link look slower than it was); when more requests wanted to go out than the
    limit allowed, an epoch whose throughput grew by at least half over the best one doubles
    the limit (a slow start: the connections still bind), one that grew by 5% to half keeps the limit and
    stops the probing (the link's total binds: twice the requests would mostly wait, hold
    memory and end together), and one that did not grow goes back to the best limit and
    stops the probing (more connections did not fill the link further).
    Throttling halves the limit at most once per round, as TCP's congestion control does:
    a refusal of a request sent before the last cut was already answered by that cut (on a
    slow link a part is refused only once its body is through, seconds after the cut its
    neighbours caused), a refusal of one sent after it halves again. A cut restarts the
    probing; each success then adds one back until the limit before the throttling is
    regained. Used on one event loop only.
    """

    def __init__(self, ceiling: int, start: int | None = None) -> None:
        self.ceiling = ceiling
        self.limit = min(ceiling, start or ceiling)
        self.regain = self.limit  # the limit before the last throttling
        self.active = 0
        self.waiting = 0
        self.lowered_at = -float("inf")  # when the limit was last halved (time.monotonic)
        self.probing = True
        self.best = (0.0, self.limit)  # the best epoch's throughput, and its limit
        self._epoch: tuple[float, int, int, bool] | None = None  # start, requests, bytes, saturated
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def __aenter__(self) -> None:
        cond = self._condition()
        async with cond:
            if self.active >= self.limit:
                self.waiting += 1
                self._saturated()
                try:
                    await cond.wait_for(lambda: self.active < self.limit)
                finally:
                    self.waiting -= 1
            if self._epoch is None or self.active == 0:  # after a pause, measure afresh
                self._epoch = (time.monotonic(), 0, 0, False)
            self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        cond = self._condition()
        async with cond:
            self.active -= 1
            cond.notify_all()

    def _saturated(self) -> None:
        if self._epoch is not None:
            self._epoch = (*self._epoch[:3], True)

    def throttled(self, sent_at: float) -> None:
        """The store refused a request sent at ``sent_at`` (``time.monotonic()``) as too many:
        fewer in flight, regained as requests succeed; unless the request went out before the
        last cut, which already answered the load it was part of."""
        if sent_at < self.lowered_at:
            logger.debug(
                "throttled: a request sent before the last cut; requests in flight stay %d", self.limit
            )
        else:
            self.regain = self.limit
            self.limit = max(1, self.limit // 2)
            logger.debug("throttled: requests in flight %d -> %d", self.regain, self.limit)
            self.lowered_at = time.monotonic()
            self.probing = True
            self.best = (0.0, self.limit)
        self._epoch = None

    async def succeeded(self, nbytes: int = 0) -> None:
        """A request went through having moved ``nbytes``: regain a throttled limit, or
        count it toward the epoch that decides whether more requests in flight pay."""
        before = self.limit
        if self.limit < self.regain:
            self.limit += 1
            if self.limit == self.regain:
                logger.debug("requests in flight regained: %d", self.limit)
        elif self._epoch is not None and nbytes:
            began, done, moved, saturated = self._epoch
            done, moved = done + 1, moved + nbytes
            self._epoch = (began, done, moved, saturated or self.waiting > 0)
            if done >= self.limit:
                self._end_epoch(moved / max(time.monotonic() - began, 1e-9), saturated or self.waiting > 0)
        if self.limit > before:
            cond = self._condition()
            async with cond:
                cond.notify_all()

    def _end_epoch(self, rate: float, saturated: bool) -> None:
        self._epoch = (time.monotonic(), 0, 0, self.waiting > 0)
        if not (saturated and self.probing and rate > 0):  # an epoch of no data tells nothing
            return
        best_rate, best_limit = self.best
        before = self.limit
        if rate >= 1.5 * best_rate:  # the connections still bind: more may move more
            self.best = (rate, self.limit)
            self.limit = min(self.ceiling, 2 * self.limit)
        elif rate >= 1.05 * best_rate:  # they helped, less than half as much as they grew:
            self.best = (rate, self.limit)  # the link's total binds, keep this many
            self.probing = False
        else:  # more in flight did not move more bytes: keep the best, stop probing
            self.limit = best_limit
            self.probing = False
        self.regain = self.limit
        logger.debug(
            "%.1f MiB/s with %d requests in flight (best %.1f MiB/s with %d): now %d",
            rate / _MiB,
            before,
            best_rate / _MiB,
            best_limit,
            self.limit,
        )


class PartGate:
    """How many parts the writer threads may hold filled or in flight: the requests the
    ``limit`` allows now plus ``spare`` (so a part is ready when a request ends): what a
    part holds (host copies of tensors, gathered small pieces) stays at about
    ``(limit + spare) * part_size``. A free place goes to the waiting file
    that was started first: files then finish one after another, each one's completion
    overlapping the next one's parts, rather than all at the end."""

    def __init__(self, limit: AdaptiveLimit, spare: int = 2) -> None:
        self.limit = limit
        self.spare = spare
        self.held = 0
        self.waiting: list[int] = []
        self._cond = threading.Condition()

    def acquire(self, order: int) -> None:
        """Wait for a place; ``order`` is the file's (lower goes first)."""
        with self._cond:
            heapq.heappush(self.waiting, order)
            try:
                self._cond.wait_for(
                    lambda: self.waiting[0] == order and self.held < self.limit.limit + self.spare
                )
            finally:
                self.waiting.remove(order)
                heapq.heapify(self.waiting)
                self._cond.notify_all()
            self.held += 1

    def release(self) -> None:
        with self._cond:
            self.held -= 1
            self._cond.notify_all()
