"""A load planner that reads regions of stored tensors (what a resharded load reads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchstow import Metadata
from torchstow.planning import (
    ChunkStorageMetadata,
    LoadPlan,
    LoadPlanner,
    MetadataIndex,
    ReadItem,
    TensorStorageMetadata,
)
from torchstow.testing._internals import LoadItemType, overlap

__all__ = ["RegionLoadPlanner"]


class RegionLoadPlanner(LoadPlanner):
    """Loads regions of stored tensors into given tensors: what a rank holding one
    shard of a resharded tensor reads.

    ``regions`` maps a key to ``(offsets, target)``: ``target`` receives the
    region of the stored tensor starting at ``offsets`` with ``target``'s shape.
    """

    def __init__(self, regions: Mapping[str, tuple[Sequence[int], torch.Tensor]]) -> None:
        self.regions = regions

    def set_up_planner(
        self, state_dict: Mapping[str, Any], metadata: Metadata, is_coordinator: bool = False
    ) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, target) in self.regions.items():
            entry = self.metadata.state_dict_metadata[fqn]
            assert isinstance(entry, TensorStorageMetadata), f"{fqn} is not a tensor"
            dest = ChunkStorageMetadata(torch.Size(offsets), target.shape)
            dest_index = MetadataIndex(fqn, dest.offsets)
            for i, chunk in enumerate(entry.chunks):
                hit = overlap(dest, chunk)
                if hit is not None:
                    items.append(
                        ReadItem(
                            LoadItemType.TENSOR,
                            dest_index,
                            hit[0],
                            MetadataIndex(fqn, chunk.offsets, i),
                            hit[1],
                            hit[2],
                        )
                    )
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise AssertionError("a region load reads no objects")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass
