"""A value made once per process on first use, and made afresh in a forked child."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ProcessLocal"]

T = TypeVar("T")


class ProcessLocal(Generic[T]):
    """One ``make()`` per process: made on the first :meth:`get`, forgotten in a forked
    child, which has none of the parent's threads (a pool or a pipeline made in the
    parent would wait there forever)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def get(self) -> T:
        """The process's value, made now if this process has none yet."""
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value

    def peek(self) -> T | None:
        """The process's value if it has been made, else None (nothing is made)."""
        return self._value

    def _forget(self) -> None:
        self._value = None
        self._lock = threading.Lock()  # a parent's thread may have held it at the fork
