"""Distributed: torchstow vs torch.distributed.checkpoint, 2 gloo ranks on this machine.

Workloads: 1 GiB of float32 DTensors (16 tensors, Shard(0) over 2 ranks, so
512 MiB per rank), saved (synced to disk by both) and loaded into
preallocated DTensors; and building the global save plan for 4 ranks x
5,000 sharded tensors on one process. The ranks run the contenders in
interleaved rounds, each round starting with the next contender, after one
untimed warm-up round; a time is from a barrier before the call to a barrier
after it, as rank 0 sees it. Loaded values are checked bit for bit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import torchstow
import torchstow.planning

from common import GiB, Report, Result, timed
from gloo_ranks import run_gloo_ranks, timed_across_ranks

WORLD = 2
NUM_TENSORS = 16
COLS = 1024


def _shards(mesh: Any, fill: bool) -> dict[str, Any]:
    """This rank's half of 1 GiB of DTensors, random (or zeros, as a load target)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = GiB // NUM_TENSORS // 4 // COLS
    local_rows = rows // WORLD
    gen = torch.Generator().manual_seed(dist.get_rank())
    out = {}
    for i in range(NUM_TENSORS):
        local = torch.randn(local_rows, COLS, generator=gen) if fill else torch.zeros(local_rows, COLS)
        out[f"layer{i}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size((rows, COLS)), stride=(COLS, 1)
        )
    return out


Contender = tuple[Callable[[Any, str], Any], Callable[[Any, str], Any] | None]
CONTENDERS: dict[str, Contender] = {
    "torchstow": (torchstow.save, torchstow.load),
    "dcp t=1": (
        lambda sd, p: dcp.save(sd, storage_writer=dcp.FileSystemWriter(p, thread_count=1)),
        lambda sd, p: dcp.load(sd, storage_reader=dcp.FileSystemReader(p)),
    ),
    "dcp t=2": (lambda sd, p: dcp.save(sd, storage_writer=dcp.FileSystemWriter(p, thread_count=2)), None),
}


def _rank_main(rank: int, world: int, root: str, repeats: int) -> dict[str, list[float]]:
    """One rank's saves and loads of its shards, timed collectively."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    source = _shards(mesh, fill=True)
    targets = {name: _shards(mesh, fill=False) for name, (_, load) in CONTENDERS.items() if load}
    times: dict[str, list[float]] = {}
    names = list(CONTENDERS)
    for round_ in range(repeats + 1):  # round 0 warms up page cache and allocator, untimed
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            save, load = CONTENDERS[name]
            path = os.path.join(root, name.replace(" ", "-").replace("=", ""))
            if rank == 0 and os.path.exists(path):
                shutil.rmtree(path)
                os.sync()
            took = timed_across_ranks(lambda s=save, p=path: s(source, p))
            if round_:
                times.setdefault(f"save {name}", []).append(took)
            if load is not None:
                took = timed_across_ranks(lambda l=load, n=name, p=path: l(targets[n], p))  # noqa: E741
                if round_:
                    times.setdefault(f"load {name}", []).append(took)
    for name, target in targets.items():
        for key, tensor in source.items():
            assert torch.equal(tensor.to_local(), target[key].to_local()), f"{name}: {key} differs"
    return times


def _plans(ranks: int, tensors: int) -> tuple[list[Any], list[Any]]:
    """The same local save plans for torchstow and DCP: every tensor sharded by rows."""
    from torch.distributed.checkpoint import metadata as dmd
    from torch.distributed.checkpoint import planner as dpl

    from torchstow.core import planning as tpl
    from torchstow.format import manifest as tmd

    size = torch.Size((8 * ranks, 16))
    ours, theirs = [], []
    for rank in range(ranks):
        offsets, sizes = torch.Size((8 * rank, 0)), torch.Size((8, 16))
        t_data = tpl.TensorWriteData(
            tmd.ChunkStorageMetadata(offsets, sizes), tmd.TensorProperties(torch.float32), size
        )
        d_data = dpl.TensorWriteData(
            dmd.ChunkStorageMetadata(offsets, sizes), dmd.TensorProperties(torch.float32), size
        )
        ours.append(
            tpl.SavePlan(
                [
                    tpl.WriteItem(tmd.MetadataIndex(f"t{i}", offsets), tpl.WriteItemType.SHARD, t_data)
                    for i in range(tensors)
                ]
            )
        )
        theirs.append(
            dpl.SavePlan(
                [
                    dpl.WriteItem(
                        index=dmd.MetadataIndex(f"t{i}", offsets),
                        type=dpl.WriteItemType.SHARD,
                        tensor_data=d_data,
                    )
                    for i in range(tensors)
                ],
                planner_data={f"t{i}": (f"t{i}",) for i in range(tensors)},
            )
        )
    return ours, theirs


def _planning(report: Report, repeats: int) -> tuple[Result, Result]:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner as DcpPlanner

    ours, theirs = _plans(4, 5000)
    workload = "plan 4x5k"
    mine = report.add(
        Result(
            workload,
            "plan",
            "torchstow",
            timed(lambda: torchstow.planning.DefaultSavePlanner().create_global_plan(ours), repeats),
            0,
        )
    )
    dcp_result = report.add(
        Result(workload, "plan", "dcp", timed(lambda: DcpPlanner().create_global_plan(theirs), repeats), 0)
    )
    return mine, dcp_result


def main(root: str, repeats: int, report: Report) -> None:
    """Run the 2-rank DTensor workload and the planning workload; record the ratios."""
    print("distributed: 2 gloo ranks, 1 GiB of DTensor shards", flush=True)
    times = run_gloo_ranks(_rank_main, WORLD, root, repeats)
    r = {
        name: report.add(Result("dist 1GiB", *name.split(" ", 1), seconds, GiB))
        for name, seconds in times.items()
    }
    report.ratio(
        "dist 1GiB save vs DCP best", r["save torchstow"], [r["save dcp t=1"], r["save dcp t=2"]], 1.5
    )
    report.ratio("dist 1GiB load vs DCP", r["load torchstow"], [r["load dcp t=1"]], 1.5)
    mine, theirs = _planning(report, repeats)
    report.ratio("plan 4 ranks x 5,000 tensors vs DCP", mine, [theirs], 1.0)
