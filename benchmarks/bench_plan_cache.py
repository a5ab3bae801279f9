"""Repeated saves of one structure over gloo ranks: plan caching, torchstow vs DCP.

Each rank holds ``tensors`` small float32 tensors of its own (64 values
each) and saves them 5 times to new directories, the values changing
between saves. torchstow runs with its default plan caching, DCP with
``DefaultSavePlanner(enable_plan_caching=True)``. Reported: the first save,
the median of saves 2-5, and the bytes the ranks exchanged while planning
saves 2-5 (torchstow counts its own collectives). A time is from a barrier
before the call to a barrier after it, as rank 0 sees it.
"""

from __future__ import annotations

import os
import shutil
import statistics
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner as DcpPlanner

import torchstow
from torchstow.core.protocol.collective import ProcessGroupCollective

from common import Report, Result
from gloo_ranks import run_gloo_ranks, timed_across_ranks

SAVES = 5


def _planning_bytes() -> list[int]:
    """Patch torchstow's collectives to count the bytes this rank sends while planning."""
    sent = [0]
    gather, scatter = ProcessGroupCollective.gather, ProcessGroupCollective.scatter

    def counted_gather(self: Any, obj: bytes, step: str = "") -> Any:
        if step == "save planning":
            sent[0] += len(obj)
        return gather(self, obj, step)

    def counted_scatter(self: Any, objs: Any, step: str = "") -> Any:
        if step == "save planning" and objs is not None:
            sent[0] += sum(map(len, objs))
        return scatter(self, objs, step)

    ProcessGroupCollective.gather = counted_gather  # type: ignore[method-assign]
    ProcessGroupCollective.scatter = counted_scatter  # type: ignore[method-assign]
    return sent


def _rank_main(rank: int, world: int, root: str, tensors: int) -> dict[str, Any]:
    """One rank's saves: times of both tools, and the planning bytes torchstow sent."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    state = {f"r{rank}.p{i}": torch.randn(64, generator=gen) for i in range(tensors)}
    sent = _planning_bytes()
    times: dict[str, list[float]] = {"torchstow": [], "dcp": []}
    planning_bytes = []
    for n in range(SAVES):
        for t in state.values():
            t.add_(1.0)
        for name in ("torchstow", "dcp") if n % 2 == 0 else ("dcp", "torchstow"):
            path = os.path.join(root, f"{name}-{n}")
            if name == "torchstow":
                before = sent[0]
                times[name].append(timed_across_ranks(lambda p=path: torchstow.save(state, p)))
                planning_bytes.append(sent[0] - before)
            else:
                planner = DcpPlanner(enable_plan_caching=True)
                times[name].append(
                    timed_across_ranks(
                        lambda p=path, pl=planner: dcp.save(state, checkpoint_id=p, planner=pl)
                    )
                )
    return {"times": times, "planning_bytes": planning_bytes}


def main(
    root: str, repeats: int, report: Report, worlds: tuple[int, ...] = (2, 4), tensors: int = 5000
) -> None:
    """Saves 1-5 on each world size; ratios of saves 2-5 vs DCP's and vs torchstow's first."""
    for world in worlds:
        print(f"plan cache: {world} gloo ranks x {tensors} small tensors, {SAVES} saves", flush=True)
        where = os.path.join(root, f"plan-cache-{world}")
        os.makedirs(where, exist_ok=True)
        found = run_gloo_ranks(_rank_main, world, where, tensors)
        shutil.rmtree(where, ignore_errors=True)
        times = found["times"]
        label = f"{world}x{tensors}"
        first = report.add(Result(label, "save1", "torchstow", times["torchstow"][:1], 0))
        ours = report.add(Result(label, "save2-5", "torchstow", times["torchstow"][1:], 0))
        report.add(Result(label, "save1", "dcp cached", times["dcp"][:1], 0))
        theirs = report.add(Result(label, "save2-5", "dcp cached", times["dcp"][1:], 0))
        report.ratio(f"saves 2-5, {world} ranks x {tensors} tensors vs DCP cached", ours, [theirs], 5.0)
        report.ratios[f"saves 2-5 vs first, {world} ranks (torchstow)"] = first.median / statistics.median(
            times["torchstow"][1:]
        )
        report.ratios[f"planning bytes sent by rank 0 in saves 2-5, {world} ranks"] = float(
            sum(found["planning_bytes"][1:])
        )
        print(f"  rank 0 sent {found['planning_bytes']} planning bytes in saves 1-{SAVES}", flush=True)
