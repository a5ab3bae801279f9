"""The checkpoint writer process of :class:`~torchstow.checkpointing.AsyncCheckpointer`.

A long-lived child process (started with ``spawn``) owns a
:class:`CheckpointWriter` and writes what the trainer staged: the trainer
sends a :class:`WriteRequest` whose tensors are references into shared
memory, the child maps those pages and writes from them, so neither the
tensor bytes nor the I/O touch the trainer's interpreter. The trainer talks
to the child from one I/O thread, one request at a time, and waits for each
answer and for the child's exit at once: a child that dies is reported on
the pending future at once, never waited on forever.

Start-up: the trainer sends a ping; the child runs the user's init function,
builds its writer, and answers (or answers with the error and exits).
Shutdown: a terminate request and a wait of up to the shutdown timeout,
then SIGKILL. The child ignores SIGINT and SIGTERM (the trainer decides when it
stops) and exits by itself when the trainer goes away.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, overload

from torchstow.checkpointing.checkpoint_io import CheckpointWriter
from torchstow.checkpointing.rank_info import RankInfo
from torchstow.checkpointing.writer_factories import WriterFactory, process_args
from torchstow.checkpointing.writer_messages import (
    PingRequest,
    Request,
    RequestKind,
    Response,
    TerminateRequest,
    WriteRequest,
    pack_state_dict,
    unpack_state_dict,
)
from torchstow.core.process_local import ProcessLocal
from torchstow.core.protocol.failures import CapturedFailure
from torchstow.core.staging.arena import SegmentMapper, SharedMemoryArena, remove_segments_of
from torchstow.errors import TorchstowError

__all__ = [
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "WriterProcessError",
    "WriterProcessTimeoutError",
]

logger = logging.getLogger(__name__)


class WriterProcessError(TorchstowError, RuntimeError):
    """The checkpoint writer process failed to start, died, or was stopped."""


class WriterProcessTimeoutError(WriterProcessError, TimeoutError):
    """The checkpoint writer process did not start in time."""


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the writer process: to start (import, init function, writer) and to stop."""

    subprocess_init_timeout_secs: float = 30
    subprocess_shutdown_timeout_secs: float = 60


def _writer_main(
    conn: multiprocessing.connection.Connection,
    rank_info: RankInfo,
    writer_factory: WriterFactory,
    init_fn: Callable[..., Any] | None,
    init_args: tuple[Any, ...],
    trainer_pid: int,
) -> None:
    """The child's whole life: start, answer requests, exit (cleaning up after a trainer that died)."""
    # Ctrl-C reaches the whole process group, and a preemption (SLURM) every process of the
    # job: the write under way, and the trainer's last save in its grace period, still commit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer: CheckpointWriter | None = None
    startup_error: CapturedFailure | None = None
    try:
        if init_fn is not None:
            init_fn(*init_args)
        writer = writer_factory(rank_info)
    except BaseException as exc:
        startup_error = CapturedFailure(exc)
    segments = SegmentMapper()
    try:
        while True:
            try:
                request: Request = conn.recv()
            except (EOFError, OSError):
                if _trainer_died(trainer_pid):  # nobody else will free its segments
                    remove_segments_of(trainer_pid)
                return
            if startup_error is not None or writer is None:
                conn.send(Response(request.kind, request.request_id, False, startup_error))
                return
            if isinstance(request, WriteRequest):
                conn.send(_write(writer, segments, request))
            else:
                conn.send(Response(request.kind, request.request_id, True))
                if request.kind is RequestKind.TERMINATE:
                    return
    finally:
        segments.close()
        if writer is not None:
            writer.close()
        conn.close()


def _trainer_died(trainer_pid: int, wait_secs: float = 2.0) -> bool:
    """Whether the trainer is gone (this process was handed to another parent).

    A dying process closes its files before its children are handed on, so
    the pipe's end can arrive a moment before the new parent: wait briefly.
    """
    deadline = time.monotonic() + wait_secs
    while os.getppid() == trainer_pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _write(writer: CheckpointWriter, segments: SegmentMapper, request: WriteRequest) -> Response:
    """Write what ``request`` carries; a rank whose state dict failed to reach the writer (in
    the trainer, or unpacking here) takes part as a failed rank, so every rank fails as one."""
    try:
        error = request.failure.exc if request.failure is not None else None
        try:
            segments.release(request.released_segments)
            if error is None:
                state_dict = unpack_state_dict(request.state_dict, segments)
        except Exception as exc:
            error = error or exc
        if error is None:
            writer.write(request.path, state_dict, **request.kwargs)
        else:
            writer.write_failed(request.path, error)
    except Exception as exc:
        return Response(RequestKind.WRITE, request.request_id, False, CapturedFailure(exc))
    return Response(RequestKind.WRITE, request.request_id, True)


# the writers this process started (a child forked from the trainer has none of them)
_LIVE: ProcessLocal[weakref.WeakSet[CheckpointProcess]] = ProcessLocal(weakref.WeakSet)


@atexit.register  # after multiprocessing's own hook (imported above), so it runs before it
def _close_at_exit() -> None:
    """Stop the writers this process started and did not close. Their queued writes are
    over by now (the interpreter joins the I/O threads first), and a writer ignores the
    SIGTERM multiprocessing would stop it with, then wait for it forever."""
    for process in list(_LIVE.peek() or ()):
        with contextlib.suppress(Exception):
            process.close()


class _NoAnswerError(Exception):
    """The child did not answer in time."""


class CheckpointProcess:
    """The trainer's side of a writer process: start it, feed it writes, stop it.

    Two constructor forms. PyTorch's: ``CheckpointProcess(rank_info, config,
    subprocess_init_fn, subprocess_init_args, checkpoint_writer_init_fn,
    checkpoint_writer_init_args)``, where the child builds its writer with
    ``checkpoint_writer_init_fn(**checkpoint_writer_init_args)`` plus
    ``rank_info`` when those arguments lack it (the default writer without
    an init function). torchstow's: ``CheckpointProcess(rank_info, config,
    writer_factory, *, subprocess_init_fn=None, subprocess_init_args=())``,
    where ``writer_factory(rank_info)`` builds it. Either way the child first
    runs ``subprocess_init_fn(*subprocess_init_args)``; all must be picklable.

    Starts the child at once and returns; the start-up handshake runs on the
    I/O thread (:attr:`process_creation_future`), and ``write`` futures
    queue behind it.
    """

    @overload
    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        subprocess_init_fn: Callable[..., Any] | None,
        subprocess_init_args: tuple[Any, ...],
        checkpoint_writer_init_fn: Callable[..., CheckpointWriter] | None,
        checkpoint_writer_init_args: dict[str, Any] | None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        writer_factory: WriterFactory,
        *,
        subprocess_init_fn: Callable[..., Any] | None = None,
        subprocess_init_args: tuple[Any, ...] = (),
    ) -> None: ...

    @overload
    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        *,
        subprocess_init_fn: Callable[..., Any] | None = None,
        subprocess_init_args: tuple[Any, ...] = (),
        checkpoint_writer_init_fn: Callable[..., CheckpointWriter] | None = None,
        checkpoint_writer_init_args: dict[str, Any] | None = None,
    ) -> None: ...

    def __init__(
        self, rank_info: RankInfo, config: CheckpointProcessConfig, *args: Any, **kwargs: Any
    ) -> None:
        writer_factory, subprocess_init_fn, subprocess_init_args = process_args(args, kwargs)
        self.rank_info = rank_info
        self.config = config
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_writer_main,
            args=(
                child_conn,
                rank_info,
                writer_factory,
                subprocess_init_fn,
                subprocess_init_args,
                os.getpid(),
            ),
            name=f"torchstow-writer-rank{rank_info.global_rank}",
            daemon=True,
        )
        self._process.start()
        child_conn.close()  # so a dead child reads as EOF here
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._closed = False
        self._killed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="torchstow-writer-io")
        self._arenas: weakref.WeakSet[SharedMemoryArena] = weakref.WeakSet()
        self._ready = self._track(self._executor.submit(self._handshake))
        _LIVE.get().add(self)

    @property
    def process_creation_future(self) -> Future[None]:
        """Completes once the writer process has started (or raises why it did not)."""
        return self._ready

    @property
    def pid(self) -> int | None:
        """The writer process's id."""
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        """The writer process's exit code (negative: killed by that signal), None while it runs."""
        return self._process.exitcode

    def is_alive(self) -> bool:
        """Whether the writer process is running."""
        return self._process.is_alive()

    def _track(self, future: Future[Any]) -> Future[Any]:
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)
        return future

    def _untrack(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _describe(self) -> str:
        return f"the checkpoint writer process of rank {self.rank_info.global_rank} (pid {self.pid})"

    def _handshake(self) -> None:
        timeout = self.config.subprocess_init_timeout_secs
        try:
            response = self._ask(PingRequest(0), "starting", time.monotonic() + timeout)
        except _NoAnswerError:
            self._kill()
            raise WriterProcessTimeoutError(
                f"{self._describe()} did not start within {timeout:g}s and was killed; if it needs "
                "longer (a slow import or init function), raise "
                "CheckpointProcessConfig.subprocess_init_timeout_secs"
            ) from None
        if not response.ok:
            detail = response.error.describe() if response.error else "no reason given"
            raise WriterProcessError(f"{self._describe()} failed to start: {detail}")
        logger.debug("%s started", self._describe())

    def _ask(self, request: Request, what: str, deadline: float | None = None) -> Response:
        """Send ``request`` and wait for its answer, the child's death, or ``deadline``."""
        try:
            self._conn.send(request)
        except (BrokenPipeError, ConnectionError, EOFError) as exc:
            raise WriterProcessError(self._death_message(what)) from exc
        waitables: list[Any] = [self._conn, self._process.sentinel]
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _NoAnswerError
            ready = multiprocessing.connection.wait(waitables, remaining)
            if self._conn in ready:
                try:
                    response: Response = self._conn.recv()
                except (EOFError, ConnectionError) as exc:
                    raise WriterProcessError(self._death_message(what)) from exc
                if response.request_id != request.request_id:
                    raise WriterProcessError(
                        f"{self._describe()} answered request {response.request_id} while "
                        f"request {request.request_id} was expected"
                    )
                return response
            if self._process.sentinel in ready and not self._conn.poll(0):
                raise WriterProcessError(self._death_message(what))

    def _death_message(self, what: str) -> str:
        self._process.join(1)
        code = self._process.exitcode
        if self._killed:
            how = "was killed because it did not stop in time"
        elif code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return f"{self._describe()} {how} while {what}; the write did not complete"

    def wait_started(self, timeout: float | None = None) -> None:
        """Block until the writer process is ready; raise its start-up error if it failed."""
        self._ready.result(timeout)

    def check(self) -> None:
        """Raise at once if the writer process failed to start or has died."""
        if self._closed:
            raise RuntimeError("this checkpoint writer process has been closed")
        if self._ready.done():
            error = self._ready.exception()
            if error is not None:
                raise error
            if not self._process.is_alive():
                raise WriterProcessError(self._death_message("idle"))

    def write(self, state_dict: Any, path: str, **kwargs: Any) -> Future[None]:
        """Queue a write of ``state_dict`` (or of what a Future of it resolves to) to ``path``.

        Returns a Future of its completion, which raises the writer's own
        exception when the write fails there, or :class:`WriterProcessError`
        if the process did not start or died. ``kwargs`` reach the commit
        hooks. Tensors in a stager's shared memory travel as references;
        others are copied into the request.
        """
        if self._closed:
            raise RuntimeError("this checkpoint writer process has been closed")
        return self._track(self._executor.submit(self._write, state_dict, str(path), kwargs))

    def _write(self, staged: Any, path: str, kwargs: Any) -> None:
        self._ready.result()
        failure = None
        try:
            state_dict = staged.result() if isinstance(staged, Future) else staged
            payload = pack_state_dict(state_dict, copy_unshared=True, arenas_used=self._arenas)
            pickle.dumps(kwargs)  # fails here, not in the pipe's send below, where it would send nothing
        except Exception as error:  # the writer still takes part, failed: no rank waits for this one
            payload, kwargs, failure = b"", {}, CapturedFailure(error)
        released = tuple(name for arena in list(self._arenas) for name in arena.take_released())
        request = WriteRequest(next(self._ids), path, payload, kwargs, released, failure)
        response = self._ask(request, f"writing {path}")
        if not response.ok:
            assert response.error is not None
            exc = response.error.exc  # the original, or a RemoteError where it did not pickle
            exc.add_note(f"writing {path} failed in {self._describe()}; in the writer process:")
            exc.add_note(response.error.describe())
            raise exc

    def _kill(self) -> None:
        if self._process.is_alive():
            self._killed = True
            self._process.kill()
        self._process.join(5)

    def close(self) -> None:
        """Let queued writes finish and stop the process, within the shutdown timeout;
        then kill it (a write still running then fails on its future)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.config.subprocess_shutdown_timeout_secs
        with self._lock:
            pending = set(self._pending)
        _, not_done = wait_futures(pending, timeout=self.config.subprocess_shutdown_timeout_secs)
        if not not_done and self._ready.exception() is None and self._process.is_alive():
            with contextlib.suppress(_NoAnswerError, WriterProcessError):
                self._ask(TerminateRequest(next(self._ids)), "stopping", deadline)
            self._process.join(max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            logger.warning("%s did not stop within the shutdown timeout; killing it", self._describe())
            self._kill()
        self._executor.shutdown(wait=True)
        self._process.join()
        self._conn.close()
