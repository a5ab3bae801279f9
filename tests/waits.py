"""Waiting for something to happen, rather than sleeping for a while and hoping it did."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(done: Callable[[], bool], timeout: float = 60.0, what: str = "the condition") -> None:
    """Return as soon as ``done()`` is true; fail the test if it is still false after
    ``timeout`` seconds. ``done`` may itself raise (or assert) to stop the wait early,
    e.g. when the process that should make it true has exited."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)
