"""dcp.save/dcp.load through torchstow's storage adapter vs DCP's own FileSystemWriter/Reader.

Both contenders run DCP's planners and protocol, one process; only the
storage differs: ``torchstow.dcp_storage_writer``/``dcp_storage_reader`` on
local files against ``dcp.FileSystemWriter`` (1 and 2 threads) and
``dcp.FileSystemReader``. Workloads: large float32 tensors, and many small
tensors with small dicts. Interleaved rounds, medians, durable saves (both
fsync), loads into a preallocated state dict, checked bit for bit.

python benchmarks/bench_dcp_adapter.py [--bytes 256] [--repeats 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch.distributed.checkpoint as dcp

import torchstow

from common import (
    GiB,
    Report,
    Result,
    assert_equal,
    fresh_dir,
    large_state_dict,
    small_state_dict,
    tensor_bytes,
    timed,
    zeros_like_state_dict,
)

ADAPTER = "dcp + torchstow storage"


def _save_adapter(sd: Any, path: str) -> None:
    dcp.save(sd, storage_writer=torchstow.dcp_storage_writer(path), no_dist=True)


def _load_adapter(sd: Any, path: str) -> None:
    dcp.load(sd, storage_reader=torchstow.dcp_storage_reader(path), no_dist=True)


def _save_dcp(threads: int) -> Any:
    return lambda sd, path: dcp.save(
        sd, storage_writer=dcp.FileSystemWriter(path, thread_count=threads), no_dist=True
    )


def _load_dcp(sd: Any, path: str) -> None:
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path), no_dist=True)


SAVES = {
    ADAPTER: _save_adapter,
    "dcp FileSystemWriter t=1": _save_dcp(1),
    "dcp FileSystemWriter t=2": _save_dcp(2),
}
LOADS = {ADAPTER: _load_adapter, "dcp FileSystemWriter t=1": _load_dcp}  # by the save they read
READER_NAMES = {ADAPTER: ADAPTER, "dcp FileSystemWriter t=1": "dcp FileSystemReader"}


def run_workload(
    report: Report, workload: str, sd: dict[str, Any], root: str, repeats: int
) -> dict[str, Result]:
    """Time every contender's save (and load) of ``sd`` in interleaved rounds."""
    nbytes = tensor_bytes(sd)
    saves: dict[str, list[float]] = {name: [] for name in SAVES}
    loads: dict[str, list[float]] = {name: [] for name in LOADS}
    targets = {name: zeros_like_state_dict(sd) for name in LOADS}
    paths = {name: os.path.join(root, f"dcp-{workload}-{i}") for i, name in enumerate(SAVES)}
    for _ in range(repeats):
        for name, save in SAVES.items():
            path = paths[name]
            saves[name] += timed(
                lambda save=save, path=path: save(sd, path), 1, lambda path=path: fresh_dir(path)
            )
            load = LOADS.get(name)
            if load is not None:
                loads[name] += timed(lambda load=load, name=name, path=path: load(targets[name], path), 1)
    for target in targets.values():
        assert_equal(sd, target)
    for path in paths.values():
        fresh_dir(path)
    out = {f"save {n}": report.add(Result(workload, "save", n, s, nbytes)) for n, s in saves.items()}
    for name, seconds in loads.items():
        out[f"load {READER_NAMES[name]}"] = report.add(
            Result(workload, "load", READER_NAMES[name], seconds, nbytes)
        )
    return out


def main(root: str, repeats: int, report: Report, total_bytes: int = GiB) -> None:
    """Both workloads; ratios are DCP's storage time / the adapter's (>1: the adapter is faster)."""
    print("dcp.save/dcp.load: torchstow's storage adapter vs DCP's FileSystemWriter/Reader", flush=True)
    dcp_saves = ["save dcp FileSystemWriter t=1", "save dcp FileSystemWriter t=2"]
    for workload, sd in (
        (f"{total_bytes // (1 << 20)}MiB", large_state_dict(total_bytes)),
        ("small", small_state_dict(5_000, 500)),
    ):
        r = run_workload(report, workload, sd, root, repeats)
        report.ratio(
            f"dcp {workload} save: adapter vs FileSystemWriter",
            r[f"save {ADAPTER}"],
            [r[k] for k in dcp_saves],
            1.0,
        )
        report.ratio(
            f"dcp {workload} load: adapter vs FileSystemReader",
            r[f"load {ADAPTER}"],
            [r["load dcp FileSystemReader"]],
            1.0,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=int, default=1024, help="MiB of the large workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.root, prefix="torchstow-bench-") as tmp:
        main(tmp, args.repeats, Report("dcp storage adapter"), args.bytes << 20)
