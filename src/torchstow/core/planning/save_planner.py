"""The default save planner: flattens the state dict, encodes leaves, and dedups replicated items."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

import torch

from torchstow.core.planning.aligned_plan import (
    Entries,
    aligned_global_plan,
    check_tensor,
    dedup_key,
    mixed_kinds,
)
from torchstow.core.planning.balance import assign_owners, item_bytes
from torchstow.core.planning.geometry import global_shape, is_raw_tensor, local_chunks
from torchstow.core.planning.items import BytesWriteData, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torchstow.core.planning.planners import SavePlanner
from torchstow.format import chunks as chunk_math
from torchstow.format.leaves import JSON, encode_object, is_json_value
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.format.structure import flatten_state_dict

__all__ = ["DefaultSavePlanner", "dedup_save_plans", "global_entries", "merge_planner_data"]


class DefaultSavePlanner(SavePlanner):
    """Flattens the state dict; writes tensors raw and non-tensor leaves as JSON or bytes.

    ``allow_pickle`` lets leaves that only full pickle can restore be saved.
    ``dedup_replicated_tensors`` drops duplicates of items that several ranks
    hold identically, keeping one copy balanced across ranks.
    ``enable_plan_caching`` (on by default) lets a save through a process group
    reuse the previous save's global plan when no rank's structure changed
    (see :mod:`torchstow.core.protocol.plan_cache`).
    """

    def __init__(
        self,
        *,
        flatten_state_dict: bool = True,
        dedup_replicated_tensors: bool = True,
        allow_pickle: bool = False,
        enable_plan_caching: bool = True,
    ) -> None:
        if not flatten_state_dict:
            raise ValueError("torchstow's DefaultSavePlanner always flattens the state dict")
        self.dedup_replicated_tensors = dedup_replicated_tensors
        self.enable_plan_caching = enable_plan_caching
        self.allow_pickle = allow_pickle
        self._chunk_data: dict[tuple[Any, ...], TensorWriteData] = {}
        self._tensors: dict[MetadataIndex, torch.Tensor] = {}
        self._payloads: dict[str, bytes] = {}
        self.plan: SavePlan | None = None

    def set_up_planner(
        self, state_dict: Mapping[str, Any], storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        self.flat = flatten_state_dict(state_dict)
        self.is_coordinator = is_coordinator

    def _write_data(
        self, tensor: torch.Tensor, chunk: ChunkStorageMetadata, size: torch.Size
    ) -> TensorWriteData:
        """The (immutable, so shared) write data of a chunk: many tensors have the same."""
        key = (tensor.dtype, tensor.requires_grad, chunk.offsets, chunk.sizes, size)
        data = self._chunk_data.get(key)
        if data is None:
            props = TensorProperties(tensor.dtype, tensor.requires_grad)
            data = self._chunk_data[key] = TensorWriteData(chunk, props, size)
        return data

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        tensors = self._tensors
        tensors.clear()
        self._payloads.clear()
        for fqn, value in self.flat.leaves.items():
            if is_raw_tensor(value):
                if value.device.type == "meta":
                    raise ValueError(f"{fqn}: a tensor on the meta device has no data to save")
                size = global_shape(value)
                chunks = local_chunks(value, fqn)
                if size.numel():  # an empty shard holds nothing of a non-empty tensor
                    chunks = [(chunk, data) for chunk, data in chunks if chunk.sizes.numel()]
                for chunk, data in chunks:
                    kind = WriteItemType.TENSOR if chunk.sizes == size else WriteItemType.SHARD
                    index = MetadataIndex(fqn, chunk.offsets)
                    tensors[index] = data
                    items.append(WriteItem(index, kind, self._write_data(value, chunk, size)))
            elif is_json_value(value):
                items.append(
                    WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO, None, BytesWriteData(JSON, value))
                )
            else:
                encoding, payload = encode_object(fqn, value, allow_pickle=self.allow_pickle)
                self._payloads[fqn] = payload
                items.append(
                    WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO, None, BytesWriteData(encoding))
                )
        plan = SavePlan(items, planner_data=self.flat.planner_data())
        self.plan = plan
        return plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        planned = aligned_global_plan(all_plans, self.dedup_replicated_tensors) if all_plans else None
        if planned is None:
            if self.dedup_replicated_tensors and len(all_plans) > 1:
                all_plans = dedup_save_plans(all_plans)
            planned = global_entries(all_plans)
        final_plans, entries = planned
        planner_data = merge_planner_data([p.planner_data for p in all_plans])
        return final_plans, Metadata(state_dict_metadata=entries, planner_data=planner_data)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """This rank's final plan, less the values the manifest holds inline (nothing to write)."""
        items = [
            item for item in new_plan.items if item.bytes_data is None or item.bytes_data.encoding != JSON
        ]
        if len(items) != len(new_plan.items):
            new_plan = SavePlan(items, new_plan.storage_data, new_plan.planner_data)
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._payloads[write_item.index.fqn])
        return self._tensors[write_item.index].detach()


def global_entries(all_plans: list[SavePlan]) -> tuple[list[SavePlan], Entries]:
    """The manifest's entries for ``all_plans`` (deduplicated already), each tensor's
    chunks validated, and the plans with their items in order (hints set)."""
    entries: Entries = {}
    final_plans = []
    for plan in all_plans:
        kept: list[WriteItem] = []
        keep = kept.append
        for item in plan.items:
            index = item.index
            fqn = index.fqn
            entry = entries.get(fqn)
            td = item.tensor_data
            if td is not None:
                if entry is None:
                    entry = entries[fqn] = TensorStorageMetadata(td.properties, td.size, [])
                elif entry.__class__ is not TensorStorageMetadata:
                    raise mixed_kinds(fqn)
                elif entry.size != td.size or entry.properties.dtype != td.properties.dtype:
                    check_tensor(fqn, entry, td)
                chunks = cast(list[ChunkStorageMetadata], entry.chunks)  # made here, as a list
                index.index = len(chunks)  # the lookup hint, as DCP fills it
                chunks.append(td.chunk)
                keep(item)
            else:
                if entry.__class__ is TensorStorageMetadata:
                    raise mixed_kinds(fqn)
                assert item.bytes_data is not None
                bd = item.bytes_data
                entries[fqn] = BytesStorageMetadata(bd.encoding, bd.value)
                keep(item)
        final_plans.append(SavePlan(kept, plan.storage_data, plan.planner_data))
    memo: dict[int, Any] = {}
    validated: set[tuple[Any, ...]] = set()  # tensors of the same chunk objects are validated once
    for fqn, entry in entries.items():
        if isinstance(entry, TensorStorageMetadata):
            key = (*entry.size, -1, *map(id, entry.chunks))
            if key not in validated:
                chunk_math.validate_cover(fqn, entry.size, entry.chunks, memo)
                validated.add(key)
    return final_plans, entries


def dedup_save_plans(all_plans: list[SavePlan]) -> list[SavePlan]:
    """Keep one copy of each item that several ranks would write.

    An item held by several ranks goes to the one :func:`assign_owners`
    picks (the fewest bytes assigned so far, then the fewest items, for
    objects whose size is not known before they are written), so replicated
    data is spread instead of piling on rank 0. Linear in the number of items, plus a sort of the
    shared ones. Items are keyed by tuples (key, offset, and a tensor's chunk sizes, shape
    and dtype: ranks that disagree keep theirs, for the entry's checks), which hash in C.
    """
    keys = [
        [(item.index.fqn, dedup_key(item.index.offset, item.tensor_data)) for item in plan.items]
        for plan in all_plans
    ]
    first: dict[tuple[str, Any], int] = {}
    holders: dict[tuple[str, Any], list[int]] = {}  # the shared items' ranks
    for rank, rank_keys in enumerate(keys):
        for key in rank_keys:
            held = first.setdefault(key, rank)
            if held != rank:
                group = holders.get(key)
                if group is None:
                    holders[key] = [held, rank]
                elif group[-1] != rank:
                    group.append(rank)
    if not holders:
        return list(all_plans)
    load = [0] * len(all_plans)
    count = [0] * len(all_plans)
    shared: dict[tuple[str, Any], WriteItem] = {}
    for rank, (plan, rank_keys) in enumerate(zip(all_plans, keys, strict=True)):
        own = [
            item.tensor_data for item, key in zip(plan.items, rank_keys, strict=True) if key not in holders
        ]
        count[rank] = len(own)
        by_id = dict(zip(map(id, own), own, strict=True))  # items share their write data
        load[rank] = sum(item_bytes(by_id[i]) * n for i, n in Counter(map(id, own)).items())
        if len(own) < len(rank_keys):
            for item, key in zip(plan.items, rank_keys, strict=True):
                if key in holders:
                    shared.setdefault(key, item)
    sizes = [(item_bytes(item.tensor_data), holders[key]) for key, item in shared.items()]
    owner = dict(zip(shared, assign_owners(load, count, sizes), strict=True))
    return [
        SavePlan(
            [item for item, key in zip(plan.items, rank_keys, strict=True) if owner.get(key, rank) == rank],
            plan.storage_data,
            plan.planner_data,
        )
        for rank, (plan, rank_keys) in enumerate(zip(all_plans, keys, strict=True))
    ]


def merge_planner_data(datas: list[Any]) -> dict[str, Any]:
    """Union of the containers and paths every rank recorded."""
    containers: dict[tuple[Any, ...], tuple[str, int]] = {}
    paths: dict[str, Any] = {}
    for data in datas:
        if not data:
            continue
        for path, kind, position in data.get("containers", []):
            containers.setdefault(tuple(path), (kind, position))
        paths.update(data.get("paths", {}))
    return {"containers": [[list(p), k, pos] for p, (k, pos) in containers.items()], "paths": paths}
