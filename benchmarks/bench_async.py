"""Async save: torchstow.async_save vs torch.distributed.checkpoint.async_save.

On 1 GiB of float32, in 64 tensors of 16 MiB and again in 16 tensors of
64 MiB, each contender makes 10 consecutive async saves to the local
filesystem, with an in-place update of the state (a training step) before
each. Per save: the time training is blocked (from the call until the state
dict may be mutated again) and the time until the checkpoint is committed;
over the 10 saves, the process's resident memory above what it held before
the first save, sampled every 2 ms by a thread and
cross-checked with the kernel's peak (VmHWM, reset via /proc/self/clear_refs).

Every round runs each contender in a fresh process of its own, contenders
alternating: each round's first save is a true first save, memory is
measured in isolation, and DCP's allocations behave as in a training process
of its own (whether its fresh staging memory comes back warm from the
allocator depends on what else the process allocated; sharing a process with
torchstow's cached buffers changes that). Both use their defaults: torchstow
stages into buffers it keeps for the next save; DCP stages into fresh memory
each time. The machine is shared, so blocked time is also recorded as the
training thread's CPU time, which other tenants' load inflates less.

The two shapes matter for DCP: it stages into fresh tensors every save, and
whether glibc hands back memory that is still mapped (a copy at memory speed)
or new pages (page faults, several times slower) depends on its dynamic mmap
threshold, which 16 MiB tensors sit under after a first free and 64 MiB ones
(above glibc's 32 MiB cap) never do. torchstow copies into the buffers it
kept, at memory speed, either way.

python benchmarks/bench_async.py --child NAME ROOT NUM_TENSORS OUT runs one round.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from common import GiB, Report, Result, assert_equal, child_result, large_state_dict, tensor_bytes

SAVES = 10
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024  # type: ignore[union-attr]


class RssSampler:
    """Samples resident memory every ``interval`` seconds; ``window()`` is the peak since the last call."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self._window = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._window = max(self._window, _rss())
            time.sleep(self.interval)

    def start(self) -> None:
        self._window = _rss()
        self._thread.start()

    def window(self) -> int:
        peak, self._window = max(self._window, _rss()), _rss()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _torchstow(sd: dict[str, Any], path: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    import torchstow

    save = torchstow.async_save(sd, path)
    return save.staged, save.result


def _dcp(sd: dict[str, Any], path: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    import torch.distributed.checkpoint as dcp

    future = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return (lambda: None), future.result  # DCP's default stages before returning


def _read_torchstow(path: str, like: dict[str, Any]) -> dict[str, Any]:
    import torchstow

    return torchstow.read(path)


def _read_dcp(path: str, like: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    target = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(target, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return target


CONTENDERS = {"torchstow": (_torchstow, _read_torchstow), "dcp": (_dcp, _read_dcp)}


def child(name: str, root: str, num_tensors: str, out: str) -> None:
    """One round: 10 async saves by ``name``, measured, written to ``out`` as JSON."""
    save, read = CONTENDERS[name]
    sd = large_state_dict(num_tensors=int(num_tensors))
    gc.collect()
    baseline = _rss()
    hwm_reset = _reset_peak()
    sampler = RssSampler()
    sampler.start()
    blocked, blocked_cpu, committed, peaks = [], [], [], []
    for i in range(SAVES):
        sd["layer0.weight"].add_(1.0)  # the training step mutates the state
        path = os.path.join(root, f"{name}-{i}")
        start, start_cpu = time.perf_counter(), time.thread_time()
        staged, done = save(sd, path)
        staged()
        blocked.append(time.perf_counter() - start)
        blocked_cpu.append(time.thread_time() - start_cpu)
        done()
        committed.append(time.perf_counter() - start)
        peaks.append(sampler.window() - baseline)
        if i < SAVES - 1:
            shutil.rmtree(path)
    sampler.stop()
    hwm = _peak() - baseline if hwm_reset else None
    assert_equal(read(os.path.join(root, f"{name}-{SAVES - 1}"), sd), sd)
    shutil.rmtree(os.path.join(root, f"{name}-{SAVES - 1}"))
    with open(out, "w") as f:
        json.dump(
            {
                "nbytes": tensor_bytes(sd),
                "blocked": blocked,
                "blocked_cpu": blocked_cpu,
                "committed": committed,
                "peak_extra_per_save": peaks,
                "peak_extra_hwm": hwm,
            },
            f,
        )


def main(root: str, repeats: int, report: Report) -> None:
    """Both tensor shapes: see the module docstring."""
    for num_tensors in (64, 16):
        run_shape(root, repeats, report, num_tensors)


def run_shape(root: str, repeats: int, report: Report, num_tensors: int) -> None:
    """Run ``repeats`` rounds per contender and record blocked times, commit times and memory."""
    label = f"1GiB/{num_tensors}"
    print(
        f"async save, 1 GiB in {num_tensors} tensors, {SAVES} consecutive saves per round, "
        f"{repeats} round(s)",
        flush=True,
    )
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    for _ in range(repeats):
        for name in CONTENDERS:
            rounds[name].append(child_result(__file__, root, name, root, str(num_tensors)))
    results: dict[str, dict[str, Result]] = {}
    for name, runs in rounds.items():
        nbytes = runs[0]["nbytes"]
        first = [run["blocked"][0] for run in runs]
        following = [t for run in runs for t in run["blocked"][1:]]
        following_cpu = [t for run in runs for t in run["blocked_cpu"][1:]]
        committed = [t for run in runs for t in run["committed"]]
        results[name] = {
            "first": report.add(Result(label, "block1", name, first, nbytes)),
            "following": report.add(Result(label, "blockN", name, following, nbytes)),
            "following_cpu": report.add(Result(label, "bNcpu", name, following_cpu, nbytes)),
            "commit": report.add(Result(label, "commit", name, committed, nbytes)),
        }
        peak = max(max(run["peak_extra_per_save"]) for run in runs) / nbytes
        hwms = [run["peak_extra_hwm"] for run in runs if run["peak_extra_hwm"] is not None]
        steady = [p / nbytes for run in runs for p in run["peak_extra_per_save"][1:]]
        spread = (max(steady) - min(steady)) if steady else 0.0
        report.ratios[f"{label} async peak extra memory / state dict ({name})"] = peak
        report.ratios[f"{label} async extra memory spread over saves 2-{SAVES} ({name})"] = spread
        hwm_text = f", kernel peak {max(hwms) / nbytes:.2f}x" if hwms else ""
        print(
            f"  {name:<10} peak extra memory {peak:.2f}x the state dict{hwm_text}; per-save peaks "
            f"{', '.join(f'{p / nbytes:.2f}' for p in runs[0]['peak_extra_per_save'])} (x state dict)",
            flush=True,
        )
        if hwms:
            report.ratios[f"{label} async kernel peak extra memory / state dict ({name})"] = (
                max(hwms) / nbytes
            )
    ours, theirs = results["torchstow"], results["dcp"]
    report.ratio(f"{label} async blocked, following saves", ours["following"], [theirs["following"]], 2.0)
    report.ratio(
        f"{label} async blocked CPU time, following saves",
        ours["following_cpu"],
        [theirs["following_cpu"]],
        2.0,
    )
    report.ratio(f"{label} async blocked, first save", ours["first"], [theirs["first"]], 1.0)
    report.ratio(f"{label} async time to commit", ours["commit"], [theirs["commit"]], 1.0)
    memory = report.ratios[f"{label} async peak extra memory / state dict (torchstow)"]
    mark = "meets" if memory <= 1.15 else "ABOVE"
    print(f"  torchstow peak extra memory {memory:.2f}x the state dict (target <= 1.15x: {mark})", flush=True)
    print(
        f"  median blocked: torchstow {statistics.median(ours['following'].seconds):.3f}s, "
        f"DCP {statistics.median(theirs['following'].seconds):.3f}s (1 GiB = {GiB} bytes)",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        sys.exit(__doc__)
