"""Shared-memory staging: torchstow's StateDictStager vs DCP's experimental DefaultStager.

What a checkpointer with a writer process blocks training on: staging the
state into shared memory another process maps. Both contenders stage on the
CPU, synchronously, with shared memory on and pinning off:
``StateDictStager(share_memory=True)`` and DCP's
``_experimental.staging.DefaultStager(CheckpointStagerConfig(use_shared_memory=True, ...))``.
Two workloads: 256 MiB of float32 in 64 tensors, and 2000 tensors of 4 KiB.
Each round stages the same state dict 10 times (an in-place update before
each, as a training step) in a fresh process per contender, contenders
alternating; it records each staging's time, whether every staged tensor is
``is_shared()``, and the resident memory above what the process held before.

python benchmarks/bench_shared.py --child NAME WORKLOAD OUT runs one round.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from common import Report, Result, child_result, large_state_dict, tensor_bytes

STAGINGS = 10
WORKLOADS = {
    "256MiB/64": lambda: large_state_dict(total_bytes=256 << 20, num_tensors=64),
    "4KiB/2000": lambda: large_state_dict(total_bytes=2000 * 4096, num_tensors=2000),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _torchstow() -> tuple[Callable[[Any], Any], Callable[[], None]]:
    from torchstow.checkpointing import StateDictStager

    stager = StateDictStager(share_memory=True)
    return stager.stage, stager.close


def _dcp() -> tuple[Callable[[Any], Any], Callable[[], None]]:
    from torch.distributed.checkpoint._experimental.staging import CheckpointStagerConfig, DefaultStager

    config = CheckpointStagerConfig(
        use_pinned_memory=False, use_shared_memory=True, use_async_staging=False, use_non_blocking_copy=False
    )
    stager = DefaultStager(config)
    return stager.stage, stager.close


CONTENDERS = {"torchstow": _torchstow, "dcp": _dcp}


def child(name: str, workload: str, out: str) -> None:
    """One round: ``STAGINGS`` stagings by ``name``, measured, written to ``out`` as JSON."""
    sd = WORKLOADS[workload]()
    first_key = next(iter(sd))
    gc.collect()
    baseline = _rss()
    stage, close = CONTENDERS[name]()
    seconds, extra = [], []
    shared = True
    for _ in range(STAGINGS):
        sd[first_key].add_(1.0)
        start = time.perf_counter()
        staged = stage(sd)
        seconds.append(time.perf_counter() - start)
        assert torch.equal(staged[first_key], sd[first_key])
        shared = shared and all(t.is_shared() for t in staged.values())
        del staged
        extra.append(_rss() - baseline)
    close()
    with open(out, "w") as f:
        json.dump({"nbytes": tensor_bytes(sd), "seconds": seconds, "extra": extra, "shared": shared}, f)


def main(root: str, repeats: int, report: Report) -> None:
    """Both workloads, ``repeats`` rounds per contender."""
    for workload in WORKLOADS:
        print(f"shared-memory staging, {workload}, {STAGINGS} stagings per round, {repeats} round(s)")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
        for _ in range(repeats):
            for name in CONTENDERS:
                rounds[name].append(child_result(__file__, root, name, workload))
        results = {}
        for name, runs in rounds.items():
            nbytes = runs[0]["nbytes"]
            first = report.add(Result(workload, "stg1", name, [r["seconds"][0] for r in runs], nbytes))
            following = [t for r in runs for t in r["seconds"][1:]]
            results[name] = (first, report.add(Result(workload, "stgN", name, following, nbytes)))
            peak = max(max(r["extra"]) for r in runs) / nbytes
            last = max(r["extra"][-1] for r in runs) / nbytes
            report.ratios[f"{workload} shared staging resident extra / state dict ({name})"] = peak
            shared = all(r["shared"] for r in runs)
            print(f"  {name:<10} is_shared {shared}; resident extra peak {peak:.2f}x, last {last:.2f}x")
        ours, theirs = results["torchstow"], results["dcp"]
        report.ratio(f"{workload} shared staging, following", ours[1], [theirs[1]], 1.0)
        report.ratio(f"{workload} shared staging, first", ours[0], [theirs[0]], 1.0)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        sys.exit(__doc__)
