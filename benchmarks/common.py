"""Shared pieces of the benchmarks: workloads, timing, and the report."""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

GiB = 1 << 30


def large_state_dict(total_bytes: int = GiB, num_tensors: int = 64) -> dict[str, torch.Tensor]:
    """``total_bytes`` of float32 in ``num_tensors`` equal 2-D tensors."""
    per = total_bytes // num_tensors // 4
    cols = 1024
    rows = per // cols
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(rows, cols, generator=gen) for i in range(num_tensors)}


def small_state_dict(num_tensors: int = 20_000, num_dicts: int = 2_000) -> dict[str, Any]:
    """Many small tensors (16 to 256 float32 each) plus small dicts of mixed values."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(16, 257, (num_tensors,), generator=gen).tolist()
    tensors = {f"p{i}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    dicts = {
        f"d{i}": {
            "step": i,
            "lr": 0.001 * (i % 7),
            "name": f"group{i}",
            "mask": torch.ones(8, dtype=torch.bool),
        }
        for i in range(num_dicts)
    }
    return {"params": tensors, "groups": dicts}


def zeros_like_state_dict(sd: Any) -> Any:
    """A preallocated target with the structure of ``sd`` (tensors zeroed, leaves kept)."""
    if isinstance(sd, dict):
        return {k: zeros_like_state_dict(v) for k, v in sd.items()}
    if isinstance(sd, torch.Tensor):
        return torch.zeros_like(sd)
    return sd


def tensor_bytes(sd: Any) -> int:
    """Bytes of tensor data in a nested state dict."""
    if isinstance(sd, dict):
        return sum(tensor_bytes(v) for v in sd.values())
    if isinstance(sd, torch.Tensor):
        return sd.numel() * sd.element_size()
    return 0


def assert_equal(a: Any, b: Any) -> None:
    """Raise unless two nested state dicts are bit-identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), "tensor mismatch"
    else:
        assert a == b, f"{a!r} != {b!r}"


def timed(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` (``before`` runs untimed first)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def child_result(script: str, root: str, *args: str) -> dict[str, Any]:
    """Run ``python SCRIPT --child *ARGS OUT`` (one round in a fresh process); the JSON it
    wrote to OUT, a temporary file under ``root``."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=root, delete=False) as f:
        out = f.name
    subprocess.run([sys.executable, os.path.abspath(script), "--child", *args, out], check=True)
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def fresh_dir(path: str) -> None:
    """Remove ``path`` (file or tree) if present, durably."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)
    os.sync()


@dataclass
class Result:
    """One timed operation of one contender on one workload."""

    workload: str
    op: str
    contender: str
    seconds: list[float]
    nbytes: int
    peak_rss: int | None = None  # bytes of resident memory the operation added at its peak

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def gib_per_s(self) -> float:
        return self.nbytes / GiB / self.median


@dataclass
class Report:
    """Collected results, printed as a table and written as JSON."""

    title: str
    results: list[Result] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # per-suite raw numbers, written as they are

    def add(self, result: Result) -> Result:
        self.results.append(result)
        print(
            f"  {result.workload:<8} {result.op:<5} {result.contender:<26} "
            f"median {result.median:7.3f}s  best {result.best:7.3f}s  "
            f"{result.gib_per_s():6.2f} GiB/s"
            + ("" if result.peak_rss is None else f"  peak +{result.peak_rss / 2**20:7.1f} MiB"),
            flush=True,
        )
        return result

    def ratio(self, name: str, ours: Result, theirs: list[Result], target: float) -> float:
        """Record ``best of theirs / ours`` by median time (>1 means torchstow is faster)."""
        best_theirs = min(r.median for r in theirs)
        value = best_theirs / ours.median
        self.ratios[name] = value
        mark = "meets" if value >= target else "BELOW"
        print(f"  ratio {name:<40} {value:6.2f}x  (target >= {target}x: {mark})", flush=True)
        return value

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        doc = {
            "title": self.title,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "results": [
                {**asdict(r), "median": r.median, "best": r.best, "gib_per_s": r.gib_per_s()}
                for r in self.results
            ],
            "ratios": self.ratios,
            **({"details": self.details} if self.details else {}),
        }
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {path}")
