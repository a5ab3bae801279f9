"""Futures: waiting on either kind the protocol accepts, and making finished ones."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # its exit hook is registered before before_pools_stop's
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "AnyFuture",
    "as_future",
    "before_pools_stop",
    "completed_future",
    "failed_future",
    "wait_future",
]

T = TypeVar("T")
AnyFuture = Any  # torch.futures.Future[T] | concurrent.futures.Future[T]


def wait_future(future: AnyFuture) -> Any:
    """Wait for a torch or concurrent future and return its value (or raise)."""
    if isinstance(future, torch.futures.Future):
        return future.wait()
    if isinstance(future, concurrent.futures.Future):
        return future.result()
    raise TypeError(
        f"expected a torch.futures.Future or concurrent.futures.Future, got {type(future).__name__}"
    )


def completed_future(value: T) -> concurrent.futures.Future[T]:
    """A future that already holds ``value``."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return future


def failed_future(error: BaseException) -> concurrent.futures.Future[Any]:
    """A future that already failed with ``error``."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_exception(error)
    return future


def as_future(value: Any) -> concurrent.futures.Future[Any]:
    """``value`` if it is already a concurrent Future, else a completed one holding it."""
    if isinstance(value, concurrent.futures.Future):
        return value
    return completed_future(value)


def before_pools_stop(fn: Callable[[], None]) -> None:
    """Call ``fn`` when the interpreter exits, before it joins the threads that are left and
    before ``concurrent.futures`` stops taking work (from then on every ``submit`` raises:
    work still under way that starts a thread pool would fail there, unseen). For waiting
    on background saves; ``fn`` must not raise."""
    # threading's exit hooks run newest first; concurrent.futures registered its own on import.
    with contextlib.suppress(RuntimeError):  # imported while the interpreter exits: too late
        threading._register_atexit(fn)  # type: ignore[attr-defined]
