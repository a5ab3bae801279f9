"""Groups of real worker processes joined by torch.distributed (gloo on 127.0.0.1).

A :class:`WorkerPool` starts ``world_size`` processes once; each joins the
process group and then runs the scenarios it is sent, one at a time, all
ranks together: ``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)``
on every rank and returns the values in rank order. Processes come from a
forkserver that has imported torch already, so starting a group is cheap.

Tests that kill or stall a rank break their group: they use
:meth:`WorkerPool.run_once`, which runs one scenario in a fresh group and
reports what happened to each rank, dead or alive.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torchstow"]
GROUP_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _send(conn: multiprocessing.connection.Connection, value: Any) -> None:
    conn.send_bytes(pickle.dumps(value))


def _recv(conn: multiprocessing.connection.Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _serve(
    rank: int, world_size: int, port: int, backend: str, conn: multiprocessing.connection.Connection
) -> None:
    """A worker: join the group, then run scenarios until told to stop."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=GROUP_TIMEOUT,
    )
    while True:
        try:
            message = _recv(conn)
        except EOFError:
            break
        if message is None:
            break
        fn, args = message
        try:
            reply = ("ok", fn(rank, world_size, *args))
        except BaseException:
            reply = ("error", traceback.format_exc())
        _send(conn, reply)
    conn.close()
    os._exit(0)  # skip interpreter teardown: a group broken by a test must not hang the exit


@dataclass
class RankOutcome:
    """What one rank did in :meth:`WorkerPool.run_once`."""

    status: str  # "ok", "error" (a traceback), "dead" (the process ended), "silent" (still running)
    value: Any = None
    exitcode: int | None = None


class WorkerPool:
    """``world_size`` worker processes in one process group (gloo unless ``backend`` says otherwise)."""

    def __init__(self, world_size: int, backend: str = "gloo") -> None:
        ctx = _context()
        port = free_port()
        self.world_size = world_size
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            # Not daemonic: a scenario may start processes of its own (a writer process).
            proc = ctx.Process(target=_serve, args=(rank, world_size, port, backend, child))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.broken = False

    def _collect(self, deadline: float, settle: float | None = None) -> list[RankOutcome]:
        """Every rank's outcome; ranks without one by ``deadline``, or ``settle``
        seconds after the last rank that did answer, are silent."""
        outcomes: list[RankOutcome | None] = [None] * self.world_size
        while any(o is None for o in outcomes):
            pending = [r for r, o in enumerate(outcomes) if o is None]
            for rank in pending:
                conn, proc = self.conns[rank], self.procs[rank]
                if conn.poll(0):
                    try:
                        status, value = _recv(conn)
                        outcomes[rank] = RankOutcome(status, value)
                    except EOFError:
                        proc.join(5)
                        outcomes[rank] = RankOutcome("dead", exitcode=proc.exitcode)
                elif not proc.is_alive():
                    outcomes[rank] = RankOutcome("dead", exitcode=proc.exitcode)
                if settle is not None and outcomes[rank] is not None:
                    deadline = min(deadline, time.monotonic() + settle)
            if time.monotonic() > deadline:
                for rank, outcome in enumerate(outcomes):
                    if outcome is None:
                        outcomes[rank] = RankOutcome("silent")
                break
            multiprocessing.connection.wait(
                [self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending], timeout=0.2
            )
        return [o for o in outcomes if o is not None]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; their values in rank order.

        Any rank raising, dying or not answering within ``timeout`` fails the
        call with every rank's story (and retires the pool if it broke).
        """
        if self.broken:
            raise RuntimeError("this worker pool broke in an earlier scenario")
        for conn in self.conns:
            _send(conn, (fn, args))
        outcomes = self._collect(time.monotonic() + timeout)
        if all(o.status == "ok" for o in outcomes):
            return [o.value for o in outcomes]
        if any(o.status in ("dead", "silent") for o in outcomes):
            self.close()
        report = "\n".join(
            f"--- rank {rank}: {o.status} {o.exitcode if o.status == 'dead' else ''}\n"
            f"{o.value if o.status == 'error' else ''}"
            for rank, o in enumerate(outcomes)
        )
        raise AssertionError(f"scenario {fn.__name__} failed:\n{report}")

    @classmethod
    def run_once(
        cls, world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, settle: float = 10.0
    ) -> list[RankOutcome]:
        """Run one scenario in a fresh group that may not survive it; every rank's outcome.

        Ranks still running at ``timeout``, or ``settle`` seconds after the
        last other rank finished, are reported silent; every process is ended.
        """
        pool = cls(world_size)
        try:
            for conn in pool.conns:
                _send(conn, (fn, args))
            outcomes = pool._collect(time.monotonic() + timeout, settle)
            for proc, outcome in zip(pool.procs, outcomes):
                if outcome.status == "silent":
                    proc.kill()
            return outcomes
        finally:
            pool.close()

    def close(self) -> None:
        """Stop the workers (those that do not stop are killed)."""
        self.broken = True
        for conn in self.conns:
            with contextlib.suppress(OSError):
                _send(conn, None)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
