"""Scenarios for the columnar write results: the same state saved by torchstow's layout
writer (results as columns) and by a writer that returns one WriteResult per item."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dist_scenarios import small_state

import torchstow
from torchstow.core.futures import completed_future
from torchstow.spi import ForwardingStorageWriter, WriteResult


def _per_item(write_data: Any) -> Any:
    def listed(plan: Any, planner: Any) -> Any:
        results = write_data(plan, planner).result()
        return completed_future([WriteResult(r.index, r.size_in_bytes, r.storage_data) for r in results])

    return listed


class PerItemWriter(ForwardingStorageWriter):
    """A third-party writer over torchstow's: its ``write_data`` gives a plain list of
    :class:`WriteResult` objects, one per item, as DCP-style writers do."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        return _per_item(self.inner.write_data)(plan, planner)


def state(rank: int, world_size: int, distributed: bool = True) -> dict[str, Any]:
    """Sharded and replicated tensors, a scalar, bf16, an object stored in a file, JSON leaves."""
    found = small_state(rank, world_size, distributed)
    found["scalar"] = torch.tensor(3.5)
    found["half"] = torch.arange(40, dtype=torch.bfloat16).reshape(8, 5)
    found["ids"] = {3, 1, 2}  # not JSON: stored in a data file (torch.save)
    return found


def _returned(md: Any) -> tuple[Any, Any]:
    return dict(md.state_dict_metadata), dict(md.storage_data.items())


def save_both_ways(rank: int, world_size: int, root: str, compression: str | None) -> dict[str, Any]:
    """Save the state through the layout writer (``columns``) and through
    :class:`PerItemWriter` (``objects``), each then again incrementally on its first
    save (``columns2``, ``objects2``: most items shared with the base, one changed; the
    layout writer's results made a list of WriteResult objects for ``objects2``);
    return what each save returned on this rank (its entries and locations)."""
    sd = state(rank, world_size)
    returned = {}
    for kind in ("columns", "objects"):
        writer = torchstow.storage_writer(f"{root}/{kind}")
        writer = writer if kind == "columns" else PerItemWriter(writer)
        returned[kind] = _returned(torchstow.save(sd, storage_writer=writer, compression=compression))
    sd["half"] = sd["half"] + 1
    for kind in ("columns", "objects"):
        writer = torchstow.storage_writer(f"{root}/{kind}2")
        if kind == "objects":
            writer.write_data = _per_item(writer.write_data)  # type: ignore[method-assign]
        md = torchstow.save(sd, storage_writer=writer, compression=compression, base=f"{root}/{kind}")
        returned[kind + "2"] = _returned(md)
    dist.barrier()
    return returned
