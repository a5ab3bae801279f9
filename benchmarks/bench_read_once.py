"""Read-once loads: 4 gloo ranks load one replicated state (every rank holds all of it)
from local files and from S3 (a moto server on 127.0.0.1), side by side:

- torchstow with read-once (the default): each stored byte is read by one rank and
  sent to the others over the gloo group;
- (one-tensor state only) torchstow with read-once but every chunk read by one rank
  (``SPLIT_BYTES`` out of reach, as before large chunks were read in parts);
- torchstow with ``read_once=False``: every rank reads everything itself;
- DCP (``FileSystemReader``, ``FsspecReader``): every rank reads everything itself.

Bytes read from storage are counted per rank (a counting byte store under
torchstow's reader; for DCP the stored lengths of the items its reader is asked
for) and summed over the ranks; the report gives them as a multiple of the
checkpoint's size, and the read-once / read-everything time ratios. A time is from
a barrier before the load to a barrier after it, as rank 0 sees it, the median of
interleaved rounds after an untimed warm-up; loaded values are checked bit for bit.

The state is 16 equal tensors, then (the ``tensors`` argument) one tensor of the same size.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import torchstow
from torchstow.core.layout.reader import LayoutReader
from torchstow.core.planning import read_once as read_once_planning
from torchstow.plugins.manager import default_registry
from torchstow.testing.counting import CountingStore

from bench_s3 import BUCKET, moto_server
from common import Report, Result, large_state_dict, zeros_like_state_dict
from gloo_ranks import run_gloo_ranks

MiB = 1 << 20
WORLD = 4


def _counted_dcp(reader: Any) -> tuple[Any, list[int]]:
    """``reader`` whose ``read_data`` adds the stored lengths of its items to the count."""
    count = [0]
    read_data = reader.read_data

    def counting(plan: Any, planner: Any) -> Any:
        infos = reader.storage_data
        count[0] += sum(infos[item.storage_index].length for item in plan.items)
        return read_data(plan, planner)

    reader.read_data = counting
    return reader, count


def _loaders(
    uri: str, options: dict[str, Any], dcp_reader: Callable[[], Any], unsplit: bool
) -> dict[str, Any]:
    """name -> load(target) returning the bytes this rank read; with ``unsplit``, also
    read-once with every chunk read by one rank."""
    backend = default_registry().backend_for(uri, options)

    def ours(read_once: bool, split: int | None = None) -> Callable[[Any], int]:
        def load(target: Any) -> int:
            store = CountingStore(backend.open_store(uri))
            default = read_once_planning.SPLIT_BYTES
            read_once_planning.SPLIT_BYTES = split or default
            try:
                torchstow.load(target, storage_reader=LayoutReader(store), read_once=read_once)
            finally:
                read_once_planning.SPLIT_BYTES = default
            return store.data_bytes

        return load

    def theirs(target: Any) -> int:
        reader, count = _counted_dcp(dcp_reader())
        dcp.load(target, storage_reader=reader)
        return count[0]

    loaders = {"torchstow read-once": ours(True), "torchstow every rank": ours(False), "dcp": theirs}
    if unsplit:
        loaders["torchstow read-once unsplit"] = ours(True, 1 << 62)
    return loaders


def _rank_main(
    rank: int, world: int, root: str, endpoint: str, mib: int, repeats: int, tensors: int
) -> dict[str, Any]:
    source = large_state_dict(mib * MiB, tensors)
    creds = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
    name = _agreed(uuid.uuid4().hex[:8])
    where: dict[str, tuple[str, dict[str, Any], Callable[[str], Any], Callable[[str], Any]]] = {
        "local": (os.path.join(root, name), {}, dcp.FileSystemWriter, dcp.FileSystemReader),
        "s3": (
            f"s3://{BUCKET}/{name}",
            creds,
            lambda url: FsspecWriter(url, **creds),
            lambda url: FsspecReader(url, **creds),
        ),
    }
    out: dict[str, Any] = {}
    for kind, (uri, options, dcp_writer, dcp_reader) in where.items():
        torchstow.save(source, uri, storage_options=options)
        dcp.save(source, storage_writer=dcp_writer(f"{uri}-dcp"))
        loaders = _loaders(uri, options, lambda u=f"{uri}-dcp", r=dcp_reader: r(u), tensors == 1)  # type: ignore[misc]
        names = list(loaders)
        for round_ in range(repeats + 1):
            for contender in names[round_ % len(names) :] + names[: round_ % len(names)]:
                target = zeros_like_state_dict(source)
                dist.barrier()
                start = time.perf_counter()
                nbytes = loaders[contender](target)
                dist.barrier()
                took = time.perf_counter() - start
                for key, tensor in source.items():
                    assert torch.equal(tensor, target[key]), f"{kind} {contender}: {key} differs"
                if round_:
                    entry = out.setdefault(f"{kind} {contender}", {"seconds": [], "read": []})
                    entry["seconds"].append(took)
                    entry["read"].append(_summed(nbytes))
        dist.barrier()
        if rank == 0:
            torchstow.delete(uri, storage_options=options)
    return out


def _agreed(value: str) -> str:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _summed(nbytes: int) -> int:
    total = torch.tensor([nbytes], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def main(root: str, repeats: int, report: Report, mib: int = 512, tensors: Sequence[int] = (16, 1)) -> None:
    """4 ranks load a replicated ``mib`` MiB state of each number of ``tensors``, read-once vs
    every rank reading it vs DCP."""
    for count in tensors:
        _case(root, repeats, report, mib, count)


def _case(root: str, repeats: int, report: Report, mib: int, tensors: int) -> None:
    print(
        f"read-once loads: {WORLD} gloo ranks, a replicated {mib} MiB state of {tensors} tensor(s)",
        flush=True,
    )
    nbytes = mib * MiB
    with moto_server() as endpoint:
        import s3fs

        fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        times = run_gloo_ranks(_rank_main, WORLD, root, endpoint, mib, repeats, tensors)
    case = "ro" if tensors == 16 else f"ro{tensors}"  # ro: the 16-tensor state's earlier name
    results: dict[str, Result] = {}
    read: dict[str, float] = {}
    for name, entry in times.items():
        kind, contender = name.split(" ", 1)
        results[name] = report.add(Result(f"{case}-{kind}", "load", contender, entry["seconds"], nbytes))
        read[name] = max(entry["read"]) / nbytes
        print(f"  {name:<38} bytes read from storage: {read[name]:5.2f}x the checkpoint", flush=True)
    details = report.details["read_once" if tensors == 16 else f"read_once_{tensors}"] = {
        "bytes_read_over_checkpoint": read,
        "mib": mib,
        "world": WORLD,
        "tensors": tensors,
    }
    label = "" if tensors == 16 else f" ({tensors} tensor)"
    ours = results["s3 torchstow read-once"]
    report.ratio(f"read-once s3 vs every rank{label}", ours, [results["s3 torchstow every rank"]], 2.0)
    report.ratio(f"read-once s3 vs dcp{label}", ours, [results["s3 dcp"]], 2.0)
    others = ["torchstow every rank", "dcp"] + (["torchstow read-once unsplit"] if tensors == 1 else [])
    if tensors == 1:
        report.ratio(
            f"read-once s3 vs unsplit{label}", ours, [results["s3 torchstow read-once unsplit"]], 1.0
        )
    # From the page cache every rank reads at memory speed: no target, shown for reference.
    for theirs in others:
        value = results[f"local {theirs}"].median / results["local torchstow read-once"].median
        details[f"local read-once vs {theirs}"] = value
        print(f"  ratio read-once local vs {theirs:<28} {value:6.2f}x  (no target)", flush=True)
