"""Runs many scenarios in one group of real gloo processes.

Starting torch processes is the slow part of a distributed test, so a test
module starts one group per world size and runs all its scenarios in it, in
order; each rank reports every scenario's outcome, and the module's tests
assert on them one by one.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Scenario:
    """What a scenario function receives on each rank."""

    rank: int
    world_size: int
    root: str  # a directory shared by the ranks, fresh for this scenario
    spare_port: int  # a free port the scenario may use (the same on every rank)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    module: str,
    names: list[str],
    root: str,
    spare: list[int],
    out: Any,
    timeout: float,
) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(timeout, exit=False)  # a hung rank shows where it hangs
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    scenarios = importlib.import_module(module)
    for name, spare_port in zip(names, spare, strict=True):
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        try:
            getattr(scenarios, name)(Scenario(rank, world_size, path, spare_port))
            out.put((rank, name, None))
        except BaseException:
            out.put((rank, name, traceback.format_exc()))
        dist.barrier()
    dist.destroy_process_group()


def run_scenarios(
    module: str, names: list[str], world_size: int, root: str, timeout: float = 120.0
) -> dict[str, dict[int, str | None]]:
    """Run ``module.<name>`` for each name on ``world_size`` ranks; outcome per name and rank.

    An outcome is None for a pass and the traceback for a failure; a rank
    that never reported (it hung or died) has the reason instead.
    """
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_port()
    spare = [free_port() for _ in names]
    processes = [
        context.Process(
            target=_worker, args=(rank, world_size, port, module, names, root, spare, out, timeout - 5)
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[str, dict[int, str | None]] = {name: {} for name in names}
    deadline = time.monotonic() + timeout
    expected = len(names) * world_size
    received = 0
    while received < expected and time.monotonic() < deadline:
        try:
            rank, name, outcome = out.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in processes):
                break
            continue
        results[name][rank] = outcome
        received += 1
    for process in processes:
        process.join(max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    for name in names:
        for rank in range(world_size):
            reason = f"rank {rank} never reported (exit code {processes[rank].exitcode})"
            results[name].setdefault(rank, reason)
    return results


def assert_passed(results: dict[str, dict[int, str | None]], name: str) -> None:
    """Fail with every rank's traceback unless scenario ``name`` passed everywhere."""
    failures = {rank: text for rank, text in results[name].items() if text is not None}
    assert not failures, "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(failures.items()))
