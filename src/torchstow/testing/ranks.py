"""Run a function on the ranks of a fresh gloo process group, one process per rank.

Self-contained on purpose: it ships in the wheel for plugin authors' tests.
The processes come from multiprocessing's forkserver (``spawn`` where there is
none), which imports torch once, so a group starts in a fraction of a second
instead of each rank importing torch; nothing else is inherited from the test
process but ``sys.path``. They meet through a file in a temporary directory
(no port to race for) and are killed if they have not all answered within
the timeout, so a test never hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_ranks"]


def _loopback() -> str:
    return "lo0" if sys.platform == "darwin" else "lo"


def _context() -> Any:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torchstow"])  # before the server starts
    return ctx


def _rank_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    rendezvous: str,
    timeout: float,
    conn: multiprocessing.connection.Connection,
) -> None:
    """One rank: join the group, run ``fn``, send back ``("ok", value)`` or ``("error", traceback)``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback())
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        # Every rank has joined before any runs ``fn``: a rank done at once and gone
        # must not close its connections while another is still making them.
        dist.barrier()
        reply: tuple[str, Any] = ("ok", fn(rank, world_size, *args))
    except BaseException:
        reply = ("error", traceback.format_exc())
    conn.send(reply)
    conn.close()
    os._exit(0)  # no interpreter teardown: a group another rank broke must not hang the exit


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 120.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on every rank of a new gloo group; the values in rank order.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function), and
    so must the values. If any rank raises, dies or has not answered within
    ``timeout`` seconds, every process is ended and an AssertionError tells
    what happened on each rank.
    """
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="torchstow-ranks-") as scratch:
        rendezvous = os.path.join(scratch, "rendezvous")
        conns, procs = [], []
        for rank in range(world_size):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(fn, args, rank, world_size, rendezvous, timeout, sender),
                name=f"torchstow-rank-{rank}",
                daemon=True,
            )
            proc.start()
            sender.close()
            conns.append(receiver)
            procs.append(proc)
        outcomes: list[tuple[str, Any]] = []
        try:
            outcomes = _collect(conns, procs, time.monotonic() + timeout)
        finally:
            for rank, proc in enumerate(procs):
                if rank >= len(outcomes) or outcomes[rank][0] == "silent":
                    proc.kill()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            for conn in conns:
                conn.close()
    if all(status == "ok" for status, _ in outcomes):
        return [value for _, value in outcomes]
    report = "\n".join(f"--- rank {rank}: {status}\n{value}" for rank, (status, value) in enumerate(outcomes))
    raise AssertionError(f"{getattr(fn, '__name__', fn)} failed on {world_size} ranks:\n{report}")


def _collect(
    conns: list[multiprocessing.connection.Connection], procs: list[Any], deadline: float
) -> list[tuple[str, Any]]:
    """Each rank's ``(status, value)``: its reply, ``("dead", exit code)`` or ``("silent", ...)``."""
    outcomes: dict[int, tuple[str, Any]] = {}
    while len(outcomes) < len(procs):
        pending = [r for r in range(len(procs)) if r not in outcomes]
        for rank in pending:
            if conns[rank].poll(0):
                try:
                    outcomes[rank] = conns[rank].recv()
                except EOFError:
                    procs[rank].join(5)
                    outcomes[rank] = ("dead", f"exit code {procs[rank].exitcode}")
            elif not procs[rank].is_alive() and not conns[rank].poll(0):
                outcomes[rank] = ("dead", f"exit code {procs[rank].exitcode}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for rank in range(len(procs)):
                outcomes.setdefault(rank, ("silent", "no answer before the timeout; killed"))
            break
        waiting = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        multiprocessing.connection.wait(waiting, timeout=min(remaining, 0.5))
    return [outcomes[rank] for rank in range(len(procs))]
