"""Time to a usable state dict: torchstow's read(mmap=True) vs torch.load(mmap=True).

Workload: ``mib`` MiB of float32 in 16 MiB tensors, saved once by torchstow
and once by ``torch.save``; then, from the page cache, in rotating order:
``read(mmap=True, verify=False)``, ``read(mmap=True)`` (checksums verified),
a plain ``read`` (copies), ``torch.load(mmap=True, weights_only=True)`` and,
where safetensors is installed, ``safetensors.torch.load_file``. Every result
is checked bit for bit (untimed).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import torch

import torchstow

from common import Report, Result, assert_equal, large_state_dict

MiB = 1 << 20


def _contenders(root: str, sd: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    ours = os.path.join(root, "mmap-torchstow")
    theirs = os.path.join(root, "mmap.pt")
    torchstow.save(sd, ours, overwrite=True)
    torch.save(sd, theirs)
    found: dict[str, Callable[[], Any]] = {
        "torchstow mmap verify=False": lambda: torchstow.read(ours, mmap=True, verify=False),
        "torchstow mmap": lambda: torchstow.read(ours, mmap=True),
        "torchstow read (copy)": lambda: torchstow.read(ours),
        "torch.load mmap": lambda: torch.load(theirs, mmap=True, weights_only=True),
    }
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import load_file, save_file

        path = os.path.join(root, "mmap.safetensors")
        save_file(sd, path)
        found["safetensors load_file"] = lambda: load_file(path)
    return found


def main(root: str, repeats: int, report: Report, mib: int = 1024) -> None:
    """Time each way to a state dict; ratios of the unverified mapped read vs the others."""
    print(f"mmap: {mib} MiB of float32 to a usable state dict", flush=True)
    sd = large_state_dict(mib * MiB, max(1, mib // 16))
    contenders = _contenders(root, sd)
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats + 1):  # round 0 warms the page cache, untimed
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            got = contenders[name]()
            took = time.perf_counter() - start
            if round_:
                times[name].append(took)
            assert_equal(got, sd)
            del got
    results = {
        name: report.add(Result(f"mmap {mib}MiB", "read", name, t, mib * MiB)) for name, t in times.items()
    }
    ours = results["torchstow mmap verify=False"]
    others = [r for name, r in results.items() if not name.startswith("torchstow")]
    report.ratio(f"read(mmap=True, verify=False) {mib} MiB vs the best other", ours, others, 1.0)
