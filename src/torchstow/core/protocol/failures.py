"""Capturing a rank's exception and carrying it to the other ranks intact.

A failure travels as the pickled exception together with a plain
description of it (type name, message, formatted traceback) and its stack.
Where the exception arrives, it is unpickled when possible, so a
``ValueError`` stays a ``ValueError``; an exception that cannot be pickled,
or not unpickled there (its class is local, or takes other constructor
arguments, or lives in a module the receiver lacks) arrives as a
:class:`~torchstow.errors.RemoteError` with the same type name,
message and traceback.

Outcomes of protocol steps cross ranks as bytes packed by :func:`pack`, so
that a value that cannot be pickled (or unpickled) becomes a failure of
its rank instead of breaking the collective under every rank.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from torchstow.errors import Failure, RemoteError, message_of

__all__ = ["CapturedFailure", "capture", "pack", "unpack"]


#: The most characters of a failure's message and traceback that travel as its description
#: (what a rank that cannot unpickle the exception itself shows, as a RemoteError).
_DESCRIBED = 64 << 10


def _describe(exc: BaseException, limit: int | None = None) -> tuple[str, str, str]:
    """Type name, message and formatted traceback of ``exc``; with ``limit``, the message and
    traceback cut to that many characters each (a note says how many more there were)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    message = message_of(exc)
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = ""
    return name, _cut(message, limit), _cut(text, limit)


def _cut(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _picklable_copy(exc: BaseException) -> bytes | None:
    """The pickled exception, if it also unpickles here; else None."""
    try:
        data = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception:
        return None
    return data


class CapturedFailure:
    """An exception raised by one rank in one protocol step, and where it was raised."""

    __slots__ = ("exc", "stack")

    def __init__(self, exc: BaseException, stack: traceback.StackSummary | None = None) -> None:
        self.exc = exc
        self.stack = stack if stack is not None else traceback.extract_tb(exc.__traceback__)

    def as_failure(self) -> Failure:
        """The ``(exception, stack)`` pair of :attr:`CheckpointException.failures`."""
        return self.exc, self.stack

    def describe(self) -> str:
        """``Type: message`` and the stack where it was raised, for messages and notes."""
        name, message, _ = _describe(self.exc)
        return f"{name}: {message}\n" + "".join(self.stack.format())

    def __reduce__(self) -> tuple[Any, ...]:
        frames = [(f.filename, f.lineno, f.name, f.line) for f in self.stack]
        return (_rebuild, (_picklable_copy(self.exc), _describe(self.exc, _DESCRIBED), frames))


def _rebuild(payload: bytes | None, description: tuple[str, str, str], frames: list[Any]) -> CapturedFailure:
    exc: BaseException | None = None
    if payload is not None:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(*description)
    return CapturedFailure(exc, traceback.StackSummary.from_list(frames))


def capture(fn: Any) -> Any:
    """``fn()``, or a :class:`CapturedFailure` if it raised."""
    try:
        return fn()
    except Exception as exc:
        return CapturedFailure(exc)


def pack(value: Any) -> tuple[bytes, CapturedFailure | None]:
    """``value`` pickled for another rank, and None; or, when it cannot be
    pickled, the failure that says why, pickled, and that failure."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), None
    except Exception as exc:
        failure = CapturedFailure(exc)
        return pickle.dumps(failure, protocol=pickle.HIGHEST_PROTOCOL), failure


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`; bytes that cannot be unpickled here become a failure."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        return CapturedFailure(exc)
