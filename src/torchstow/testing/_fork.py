"""Running a check in a child process forked from the test process, with a timeout.

The byte-store kit forks to see a store from another process (what a
distributed job's ranks do) and to catch state a store carries across
``fork`` (a database connection or socket opened before it).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import stat
import time
import traceback
from collections.abc import Callable

__all__ = ["can_fork", "run_forked"]


def can_fork() -> bool:
    """Whether this platform has ``os.fork``."""
    return hasattr(os, "fork")


def _neutralize_inherited_connections(keep: set[int]) -> int:
    """Point every inherited socket and regular-file descriptor (but 0-2 and ``keep``) at
    /dev/null, so a connection opened before the fork fails (or loses its data) when the
    child uses it, as it eventually would while the parent uses it too. Returns how many."""
    devnull = os.open(os.devnull, os.O_RDWR)
    count = 0
    for entry in os.listdir("/dev/fd"):
        fd = int(entry)
        if fd <= 2 or fd in keep or fd == devnull:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue  # the descriptor of the listing itself, closed by now
        if stat.S_ISSOCK(mode) or stat.S_ISREG(mode):
            os.dup2(devnull, fd)
            count += 1
    return count


def run_forked(check: Callable[[], object], *, timeout: float, cut_connections: bool = False) -> object:
    """Run ``check`` in a forked child and return what it returns.

    An exception in the child is raised here as an AssertionError carrying the
    child's traceback; a child that does not answer within ``timeout`` seconds
    is killed and reported. ``cut_connections`` first makes the descriptors the
    child inherited unusable (see :func:`_neutralize_inherited_connections`).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        status = 0
        try:
            os.close(read_end)
            if cut_connections:
                _neutralize_inherited_connections({write_end})
            try:
                answer: tuple[bool, object] = (True, check())
            except BaseException:
                answer = (False, traceback.format_exc())
            payload = pickle.dumps(answer)
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view) :]
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([read_end], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the forked child gave no answer within {timeout:g} s (killed)")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError("the forked child died without an answer")
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise AssertionError(f"in the forked child:\n{value}")
    return value
