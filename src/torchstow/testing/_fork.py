"""Running checks in child processes forked from the test process, with timeouts.

The byte-store kit forks to see a store from another process (what a
distributed job's ranks do), to race ``publish_new`` across processes, and to
catch state a store carries across ``fork`` (a database connection or socket
opened before it).
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
from typing import Any

__all__ = ["ForkedWorker", "can_fork", "run_forked"]


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


def _send(fd: int, value: Any) -> None:
    payload = pickle.dumps(value)
    view = memoryview(len(payload).to_bytes(8, "little") + payload)
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int, deadline: float | None) -> Any:
    """The next value sent on ``fd``; EOFError when the other end closed, TimeoutError past ``deadline``."""

    def exactly(nbytes: int) -> bytes:
        chunks, left = [], nbytes
        while left:
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                    raise TimeoutError
            chunk = os.read(fd, left)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return pickle.loads(exactly(int.from_bytes(exactly(8), "little")))


class ForkedWorker:
    """A forked child that answers messages with ``serve(message)``, until closed.

    ``ask`` (or ``send`` then ``receive``, to keep several workers busy at once)
    returns the answer; an exception in the child is raised here as an
    AssertionError carrying the child's traceback, and a child that does not
    answer within ``timeout`` seconds is killed and reported. ``cut_connections``
    first makes the descriptors the child inherited unusable (see
    :func:`_neutralize_inherited_connections`).
    """

    def __init__(self, serve: Callable[[Any], Any], *, timeout: float, cut_connections: bool = False) -> None:
        self.timeout = timeout
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the caller
            status = 0
            try:
                os.close(to_child)
                os.close(from_child)
                if cut_connections:
                    _neutralize_inherited_connections({from_parent, to_parent})
                while True:
                    # An explicit stop, not EOF: a sibling forked later holds our pipe open too.
                    try:
                        stop, message = _receive(from_parent, None)
                    except EOFError:
                        break
                    if stop:
                        break
                    try:
                        answer: tuple[bool, Any] = (True, serve(message))
                    except BaseException:
                        answer = (False, traceback.format_exc())
                    _send(to_parent, answer)
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(from_parent)
        os.close(to_parent)
        self._to, self._from = to_child, from_child

    def send(self, message: Any) -> None:
        """Give the child ``message`` to serve."""
        _send(self._to, (False, message))

    def receive(self) -> Any:
        """The child's answer to the oldest message not yet answered."""
        try:
            ok, value = _receive(self._from, time.monotonic() + self.timeout)
        except TimeoutError:
            self.close(kill=True)
            raise AssertionError(
                f"the forked child gave no answer within {self.timeout:g} s (killed)"
            ) from None
        except EOFError:
            self.close(kill=True)
            raise AssertionError("the forked child died without an answer") from None
        if not ok:
            raise AssertionError(f"in the forked child:\n{value}")
        return value

    def ask(self, message: Any) -> Any:
        """``send`` then ``receive``."""
        self.send(message)
        return self.receive()

    def close(self, *, kill: bool = False) -> None:
        """Let the child finish (or kill it) and reap it."""
        if self.pid <= 0:
            return
        pid, self.pid = self.pid, 0
        if not kill:
            with contextlib.suppress(OSError):
                _send(self._to, (True, None))
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + self.timeout
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)


def run_forked(check: Callable[[], Any], *, timeout: float, cut_connections: bool = False) -> Any:
    """Run ``check`` in a forked child and return what it returns (see :class:`ForkedWorker`)."""
    worker = ForkedWorker(lambda _: check(), timeout=timeout, cut_connections=cut_connections)
    try:
        return worker.ask(None)
    finally:
        worker.close()
