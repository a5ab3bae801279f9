"""Keeping S3 requests moving: an adaptive limit on requests in flight (halved when the
store throttles, regained one at a time as requests succeed), and a watchdog that cancels
a request which makes no progress for ``stall_timeout`` seconds, so the retry policy
sends it again instead of waiting on a dead connection."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["AdaptiveLimit", "Progress", "ProgressBody", "StallError", "watch"]

T = TypeVar("T")


class StallError(TimeoutError):
    """A request made no progress for ``stall_timeout`` seconds and was cancelled (transient)."""


class Progress:
    """When a request last moved a byte (or started)."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def mark(self) -> None:
        self.at = time.monotonic()


class ProgressBody(io.RawIOBase):
    """A request body over ``data`` without copying it, marking ``progress`` as the
    HTTP client reads it (it reads as the socket takes the bytes)."""

    def __init__(self, data: memoryview | bytes | bytearray, progress: Progress) -> None:
        super().__init__()
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        self.progress.mark()
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size is None or size < 0 else min(len(self.data), self.pos + size)
        chunk = bytes(self.data[self.pos : end])
        self.pos = end
        self.progress.mark()
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.data)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return len(self.data)


async def watch(request: Awaitable[T], progress: Progress, stall_timeout: float, what: str) -> T:
    """Await ``request``; cancel it and raise :class:`StallError` once ``progress`` has not
    moved for ``stall_timeout`` seconds."""
    task = asyncio.ensure_future(request)
    try:
        while True:
            left = progress.at + stall_timeout - time.monotonic()
            if left <= 0:
                task.cancel()
                raise StallError(
                    f"no progress for {stall_timeout:g}s (stall_timeout); the request was cancelled"
                )
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


class AdaptiveLimit:
    """At most ``limit`` requests in flight, between 1 and ``ceiling``.

    Throttling halves the limit (at most once per ``cooldown`` seconds, so one burst of
    refusals counts once); each run of ``limit`` successes in a row raises it by one,
    back up to ``ceiling``. Used on one event loop only.
    """

    def __init__(self, ceiling: int, cooldown: float = 1.0) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.cooldown = cooldown
        self.active = 0
        self.successes = 0
        self.lowered_at = -float("inf")
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def __aenter__(self) -> None:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def __aexit__(self, *exc: object) -> None:
        cond = self._condition()
        async with cond:
            self.active -= 1
            cond.notify_all()

    def throttled(self) -> None:
        """The store refused a request as too many: fewer in flight."""
        now = time.monotonic()
        if now - self.lowered_at >= self.cooldown:
            self.limit = max(1, self.limit // 2)
            self.lowered_at = now
        self.successes = 0

    async def succeeded(self) -> None:
        """A request went through: after ``limit`` of them in a row, one more in flight."""
        self.successes += 1
        if self.successes >= self.limit and self.limit < self.ceiling:
            self.limit += 1
            self.successes = 0
            cond = self._condition()
            async with cond:
                cond.notify_all()
