"""Retrying remote storage operations: which errors are transient, and backoff.

A remote byte store wraps each request (a part upload, a ranged read, a
listing) in :meth:`RetryPolicy.call` (or :meth:`RetryPolicy.acall` inside a
coroutine). Transient failures (HTTP 5xx, throttling, timeouts, connection
resets) are retried with exponential backoff and jitter; anything else fails
at once. Either way a failure surfaces as a :class:`StorageIOError` naming the
operation, the object and what the server said, except a missing object,
which stays a ``FileNotFoundError`` for the layout to interpret.

Errors are recognized by duck typing (status codes, error codes, class
names) so no storage client library needs importing here, and the same
rules serve botocore, aiohttp, gcsfs and plain sockets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from torchstow.core.storage.store import StorageIOError

__all__ = ["RetryPolicy", "describe_error", "error_status", "is_transient"]

logger = logging.getLogger("torchstow")

T = TypeVar("T")

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT})
# Connection-level failures of the HTTP stacks fsspec implementations use
# (botocore, aiohttp, http.client), by class name.
_TRANSIENT_CLASSES = frozenset(
    {
        "HTTPClientError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        "FSTimeoutError",
    }
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and service error code an exception carries, if any."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return (status if isinstance(status, int) else None), code
    for attr in ("status", "status_code", "code"):  # aiohttp, requests, gcsfs
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None
    return None, None


def error_status(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and service error code behind ``exc`` (or the errors it came from)."""
    for err in _chain(exc):
        found = _http_status(err)
        if found != (None, None):
            return found
    return None, None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed."""
    for err in _chain(exc):
        if isinstance(err, FileNotFoundError | PermissionError | FileExistsError | IsADirectoryError):
            return False
        status, code = _http_status(err)
        if code in _TRANSIENT_CODES:
            return True
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(err).__mro__):
            return True
    return False


def describe_error(exc: BaseException) -> str:
    """A one-line account of a storage error: the service's code and status where known."""
    for err in _chain(exc):
        status, code = _http_status(err)
        if code is not None or status is not None:
            message = ""
            response = getattr(err, "response", None)
            if isinstance(response, dict):
                message = response.get("Error", {}).get("Message") or ""
            what = " ".join(p for p in (code, f"(HTTP {status})" if status else None) if p)
            return f"{what}: {message}" if message else what
    return f"{type(exc).__name__}: {exc}"


def _is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or is_transient(exc) or _http_status(exc) != (None, None)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures.

    ``attempts`` counts the first try; the wait before the ``k``-th retry is
    ``base_delay * 2**(k - 1)``, at most ``max_delay``, times a random
    factor in [0.5, 1] (jitter, so ranks retrying together spread out).
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must not be negative")

    def _next_delay(self, exc: BaseException, attempt: int, what: str) -> float:
        """The wait before the next attempt, or raise the error to give up with."""
        if isinstance(exc, FileNotFoundError) or not _is_storage_error(exc):
            raise exc
        if not is_transient(exc):
            raise StorageIOError(
                f"{what} failed: {describe_error(exc)} (a permanent error, not retried)",
                attempts=attempt,
                transient=False,
            ) from exc
        if attempt >= self.attempts:
            raise StorageIOError(
                f"{what} failed after {attempt} attempt(s), each with a transient error; "
                f"the last: {describe_error(exc).rstrip('.')}. The store is unavailable or overloaded: "
                "try again later, or raise retry_attempts",
                attempts=attempt,
                transient=True,
            ) from exc
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        logger.info(
            "%s: %s; retrying in %.2fs (attempt %d of %d)",
            what,
            describe_error(exc),
            delay,
            attempt + 1,
            self.attempts,
        )
        return delay

    def call(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, retried on transient errors; ``what`` names the operation in errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                time.sleep(self._next_delay(exc, attempt, what))

    async def acall(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """:meth:`call` for coroutines: awaits ``fn()``, sleeping without blocking the loop."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except Exception as exc:
                await asyncio.sleep(self._next_delay(exc, attempt, what))
