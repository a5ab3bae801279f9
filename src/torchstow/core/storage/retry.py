"""Retrying remote storage operations: which errors are transient, and backoff.

A remote byte store wraps each request (a part upload, a ranged read, a
listing) in :meth:`RetryPolicy.call` (or :meth:`RetryPolicy.acall` inside a
coroutine). Transient failures (HTTP 5xx, throttling, timeouts, connection
resets) are retried with exponential backoff and jitter; anything else fails
at once. Either way a failure surfaces as a :class:`StorageIOError` naming the
operation, the object and what the server said, except a missing object,
which stays a ``FileNotFoundError`` for the layout to interpret.

Errors are recognized by duck typing (status codes, error codes, class
names) so no storage client library needs importing here. What a particular
family of libraries raises (botocore's service errors, aiohttp's dropped
connections) is described by :class:`ErrorRules` that its backend passes in.
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

__all__ = [
    "GENERIC",
    "ErrorRules",
    "RetryPolicy",
    "StatusReader",
    "describe_error",
    "error_status",
    "is_transient",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT})

StatusReader = Callable[[BaseException], tuple[int | None, str | None, str]]
"""Reads ``(HTTP status, service error code, service message)`` off a client library's exception."""


@dataclass(frozen=True)
class ErrorRules:
    """How to read the exceptions of a family of storage client libraries.

    ``transient_codes`` are service error codes worth retrying (throttling,
    internal errors), ``transient_classes`` names of exception classes that
    mean a dropped connection, and ``read_status`` reads the status a
    library attaches in its own way. The default rules know only what any
    HTTP stack shares: ``status``/``status_code``/``code`` attributes, 5xx,
    408 and 429, connection and timeout errors. A backend passes its own
    (the fsspec backend's for botocore, aiohttp and fsspec live with it).
    """

    transient_codes: frozenset[str] = frozenset()
    transient_classes: frozenset[str] = frozenset()
    read_status: StatusReader | None = None

    def status(self, exc: BaseException) -> tuple[int | None, str | None]:
        """:func:`error_status` of ``exc`` by these rules."""
        return error_status(exc, self)

    def is_transient(self, exc: BaseException) -> bool:
        """:func:`is_transient` of ``exc`` by these rules."""
        return is_transient(exc, self)

    def describe(self, exc: BaseException) -> str:
        """:func:`describe_error` of ``exc`` by these rules."""
        return describe_error(exc, self)


GENERIC = ErrorRules()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException, rules: ErrorRules) -> tuple[int | None, str | None, str]:
    """The HTTP status, service error code and message an exception carries, if any."""
    if rules.read_status is not None:
        found = rules.read_status(exc)
        if found[:2] != (None, None):
            return found
    for attr in ("status", "status_code", "code"):  # aiohttp, requests, gcsfs
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value, None, ""
    return None, None, ""


def error_status(exc: BaseException, rules: ErrorRules = GENERIC) -> tuple[int | None, str | None]:
    """The HTTP status and service error code behind ``exc`` (or the errors it came from)."""
    for err in _chain(exc):
        status, code, _ = _http_status(err, rules)
        if (status, code) != (None, None):
            return status, code
    return None, None


def is_transient(exc: BaseException, rules: ErrorRules = GENERIC) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed."""
    for err in _chain(exc):
        if isinstance(err, FileNotFoundError | PermissionError | FileExistsError | IsADirectoryError):
            return False
        if isinstance(err, StorageIOError):  # torchstow's own account of a failure says which
            return err.transient
        status, code, _ = _http_status(err, rules)
        if code in rules.transient_codes:
            return True
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in rules.transient_classes for cls in type(err).__mro__):
            return True
    return False


def describe_error(exc: BaseException, rules: ErrorRules = GENERIC) -> str:
    """A one-line account of a storage error: the service's code and status where known."""
    for err in _chain(exc):
        status, code, message = _http_status(err, rules)
        if code is not None or status is not None:
            what = " ".join(p for p in (code, f"(HTTP {status})" if status else None) if p)
            return f"{what}: {message}" if message else what
    return f"{type(exc).__name__}: {exc}"


def _is_storage_error(exc: BaseException, rules: ErrorRules) -> bool:
    return (
        isinstance(exc, OSError) or is_transient(exc, rules) or _http_status(exc, rules)[:2] != (None, None)
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures.

    ``attempts`` counts the first try; the wait before the ``k``-th retry is
    ``base_delay * 2**(k - 1)``, at most ``max_delay``, times a random
    factor in [0.5, 1] (jitter, so ranks retrying together spread out).
    ``rules`` tell which errors are transient (see :class:`ErrorRules`).
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    rules: ErrorRules = GENERIC

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays must not be negative")

    def _next_delay(self, exc: BaseException, attempt: int, what: str) -> float:
        """The wait before the next attempt, or raise the error to give up with."""
        # A missing file and an existing one (publish_new's refusal) mean something to the
        # caller, as do torchstow's own errors (StorageFullError, NotDurableError): as they are.
        if isinstance(exc, FileNotFoundError | FileExistsError) or not _is_storage_error(exc, self.rules):
            raise exc
        if not is_transient(exc, self.rules):
            if isinstance(exc, StorageIOError):
                raise exc
            raise StorageIOError(
                f"{what} failed: {describe_error(exc, self.rules)} (a permanent error, not retried)",
                attempts=attempt,
                transient=False,
            ) from exc
        if attempt >= self.attempts:
            refused = any(isinstance(err, ConnectionRefusedError) for err in _chain(exc))
            advice = (
                "Nothing accepts connections there: check the endpoint (endpoint_url, "
                "AWS_ENDPOINT_URL) and that the service is running"
                if refused
                else "The store is unavailable or overloaded: try again later, or raise retry_attempts"
            )
            raise StorageIOError(
                f"{what} failed after {attempt} attempt(s), each with a transient error; "
                f"the last: {describe_error(exc, self.rules).rstrip('.')}. {advice}",
                attempts=attempt,
                transient=True,
            ) from exc
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        logger.info(
            "%s: %s; retrying in %.2fs (attempt %d of %d)",
            what,
            describe_error(exc, self.rules),
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
