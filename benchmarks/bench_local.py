"""Local filesystem: torchstow vs torch.distributed.checkpoint vs torch.save, one process.

Workloads: 1 GiB of float32 in 64 tensors, and 20,000 small tensors plus
2,000 small dicts. Every save is synced to disk (DCP's default sync_files,
an fsync after torch.save); loads fill a preallocated state dict. Contenders
run in interleaved rounds, so a slow spell of the disk hits them all alike;
the report uses each contender's median.

For the 1 GiB load, the limit is measured in the same rounds: 2 threads
``readinto`` of the same bytes (torchstow's data files, warm in the page cache)
into the same preallocated tensors torchstow's load just filled, each thread half
of them; and the same with CRC-32C computed over each 1 MiB piece as it lands, while
it is in cache, by the function torchstow verifies with (what verifying every byte
adds at the least: the cheapest piece size measured, 4 MiB pieces cost 5% more CPU).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import torchstow
from torchstow.format.checksums import checksum

from common import (
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


def _torch_save(sd: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())


def _copy_into(dst: Any, src: Any) -> None:
    for key, value in src.items():
        if isinstance(value, dict):
            _copy_into(dst[key], value)
        elif isinstance(value, torch.Tensor):
            dst[key].copy_(value)
        else:
            dst[key] = value


def _regions(path: str, target: dict[str, torch.Tensor]) -> list[tuple[str, int, memoryview]]:
    """(file, offset, the tensor's bytes) of each tensor of torchstow's checkpoint at
    ``path``, whose stored bytes are those of ``target``'s tensor of that key."""
    metadata = torchstow.storage_reader(path).read_metadata()
    regions = []
    for index, info in metadata.storage_data.items():
        view = memoryview(target[index.fqn].numpy()).cast("B")
        assert info.length == len(view) and info.codec is None, index.fqn
        regions.append((os.path.join(path, info.relative_path), info.offset, view))
    return sorted(regions, key=lambda r: (r[0], r[1]))


def readinto_limit(regions: list[tuple[str, int, memoryview]], crc: bool, threads: int = 2) -> None:
    """Read each region's bytes into its tensor with ``threads`` threads, each ``readinto``
    its share of them (with ``crc``: CRC-32C of each 1 MiB piece once it is read)."""
    piece = 1 << 20 if crc else 64 << 20
    pieces = [
        (path, offset + pos, view[pos : pos + piece])
        for path, offset, view in regions
        for pos in range(0, len(view), piece)
    ]
    share = -(-len(pieces) // threads)

    def work(mine: list[tuple[str, int, memoryview]]) -> None:
        handles: dict[str, Any] = {}
        for path, pos, view in mine:
            f = handles.get(path) or handles.setdefault(path, open(path, "rb", buffering=0))  # noqa: SIM115
            f.seek(pos)
            got = 0
            while got < len(view):
                got += f.readinto(view[got:])
            if crc:
                checksum(view)
        for f in handles.values():
            f.close()

    workers = [
        threading.Thread(target=work, args=(pieces[i * share : (i + 1) * share],)) for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@dataclass
class Contender:
    """One way to save and load: ``save(sd, path)`` and ``load(target, path)``."""

    name: str
    save: Callable[[Any, str], Any]
    load: Callable[[Any, str], Any] | None


CONTENDERS = [
    Contender("torchstow", torchstow.save, torchstow.load),
    Contender(
        "dcp t=1",
        lambda sd, p: dcp.save(sd, storage_writer=dcp.FileSystemWriter(p, thread_count=1), no_dist=True),
        lambda sd, p: dcp.load(sd, storage_reader=dcp.FileSystemReader(p), no_dist=True),
    ),
    Contender(
        "dcp t=2",
        lambda sd, p: dcp.save(sd, storage_writer=dcp.FileSystemWriter(p, thread_count=2), no_dist=True),
        None,  # the reader is the same as above
    ),
    Contender("torch.save", _torch_save, lambda sd, p: _copy_into(sd, torch.load(p, weights_only=True))),
]


def run_workload(
    report: Report, workload: str, sd: dict[str, Any], root: str, repeats: int, limit: bool = False
) -> dict[str, Result]:
    """Time save and load of ``sd`` for every contender, in interleaved rounds (with
    ``limit``, also :func:`readinto_limit` of torchstow's data files into its targets
    after its load)."""
    nbytes = tensor_bytes(sd)
    saves: dict[str, list[float]] = {c.name: [] for c in CONTENDERS}
    loads: dict[str, list[float]] = {c.name: [] for c in CONTENDERS if c.load}
    targets = {c.name: zeros_like_state_dict(sd) for c in CONTENDERS if c.load}
    limits: dict[str, list[float]] = {"2 threads readinto": [], "readinto + crc32c": []} if limit else {}
    for _ in range(repeats):
        for c in CONTENDERS:
            path = os.path.join(root, f"{workload}-{c.name.replace(' ', '_')}")
            saves[c.name] += timed(
                lambda c=c, path=path: c.save(sd, path), 1, lambda path=path: fresh_dir(path)
            )
            if c.load:
                loads[c.name] += timed(lambda c=c, path=path: c.load(targets[c.name], path), 1)
            if limit and c is CONTENDERS[0]:  # the same bytes into the same tensors, right after
                regions = _regions(path, targets[c.name])
                for name, crc in (("2 threads readinto", False), ("readinto + crc32c", True)):
                    limits[name] += timed(lambda r=regions, crc=crc: readinto_limit(r, crc), 1)
    for target in targets.values():
        assert_equal(sd, target)
    out = {}
    for name, seconds in saves.items():
        out[f"save {name}"] = report.add(Result(workload, "save", name, seconds, nbytes))
    for name, seconds in loads.items():
        out[f"load {name}"] = report.add(Result(workload, "load", name, seconds, nbytes))
    for name, seconds in limits.items():
        out[f"load {name}"] = report.add(Result(workload, "load", name, seconds, nbytes))
    for c in CONTENDERS:
        fresh_dir(os.path.join(root, f"{workload}-{c.name.replace(' ', '_')}"))
    return out


def main(root: str, repeats: int, report: Report) -> None:
    """Run both workloads and record the torchstow/DCP ratios."""
    print("local filesystem, single process", flush=True)
    dcp_writers = ["save dcp t=1", "save dcp t=2"]
    for workload, sd, save_target, load_target in (
        ("1GiB", large_state_dict(), 1.5, 4.0),
        ("small", small_state_dict(), 5.0, 5.0),
    ):
        r = run_workload(report, workload, sd, root, repeats, limit=workload == "1GiB")
        report.ratio(
            f"{workload} save vs DCP best", r["save torchstow"], [r[k] for k in dcp_writers], save_target
        )
        report.ratio(f"{workload} load vs DCP", r["load torchstow"], [r["load dcp t=1"]], load_target)
        if workload == "1GiB":
            # a fraction of the limit's speed (its time / torchstow's), >= 0.85 wanted
            limit = [r["load 2 threads readinto"]]
            report.ratio("1GiB load vs 2 threads readinto", r["load torchstow"], limit, 0.85)
            report.ratio("1GiB readinto+crc32c vs readinto", r["load readinto + crc32c"], limit, 0.85)
