"""Benchmark ranks: real processes joined by a gloo group on 127.0.0.1."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed_across_ranks(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()`` run by every rank of the default group: from all ranks
    ready to all ranks done, so the slowest rank's time (on every rank)."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rank_entry(
    body: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple[Any, ...]
) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    value = body(rank, world, *args)
    if rank == 0:
        results.put(value)
    dist.barrier()
    dist.destroy_process_group()


def run_gloo_ranks(body: Callable[..., Any], world: int, *args: Any) -> Any:
    """Run ``body(rank, world, *args)`` on ``world`` spawned ranks of a new gloo group;
    rank 0's value. A rank that fails ends them all with a RuntimeError (its traceback
    is printed by the rank)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(body, r, world, port, results, args)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    while True:
        try:
            value = results.get(timeout=1)
            break
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                for proc in procs:
                    proc.kill()
                raise RuntimeError("a benchmark rank failed (its traceback is above)") from None
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a benchmark rank exited with {proc.exitcode}")
    return value
