"""Translating plans, items and metadata between torchstow and DCP.

torchstow's protocol types mirror torch.distributed.checkpoint's field for
field, so each conversion is a rebuild of the same values under the other
library's classes. DCP's nested-key mappings (``fqn -> path``) and
torchstow's recorded structure (containers and paths) are translated too,
so either library can rebuild the nesting of a checkpoint the other wrote.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import planner as dcp_plan

from torchstow.core import planning as ts_plan
from torchstow.format import manifest as ts_md
from torchstow.format.dcp_metadata import (
    planner_data_from_mappings,
    ts_index,
    ts_metadata_entries,
    ts_props,
    ts_tensor_entry,
)
from torchstow.format.leaves import TORCH
from torchstow.format.structure import LIST, TUPLE, leaf_paths

__all__ = [
    "dcp_index",
    "dcp_load_plan",
    "dcp_mappings",
    "dcp_metadata",
    "dcp_read_item",
    "dcp_tensor_entry",
    "planner_data_from_mappings",
    "ts_index",
    "ts_load_plan",
    "ts_metadata_entries",
    "ts_read_item",
    "ts_tensor_entry",
    "ts_write_item",
]


def dcp_index(index: ts_md.MetadataIndex) -> dcp_md.MetadataIndex:
    """A torchstow MetadataIndex as DCP's."""
    return dcp_md.MetadataIndex(index.fqn, index.offset, index.index)


def _dcp_props(props: ts_md.TensorProperties) -> dcp_md.TensorProperties:
    return dcp_md.TensorProperties(
        dtype=props.dtype,
        layout=props.layout,
        requires_grad=props.requires_grad,
        memory_format=props.memory_format,
        pin_memory=props.pin_memory,
    )


def dcp_tensor_entry(entry: ts_md.TensorStorageMetadata) -> dcp_md.TensorStorageMetadata:
    """A torchstow tensor entry as DCP's."""
    chunks = [dcp_md.ChunkStorageMetadata(c.offsets, c.sizes) for c in entry.chunks]
    return dcp_md.TensorStorageMetadata(_dcp_props(entry.properties), entry.size, chunks)


def dcp_metadata(md: ts_md.Metadata) -> dcp_md.Metadata:
    """A torchstow manifest as DCP's Metadata; ``storage_data`` carries the torchstow
    manifest itself, for the reader on each rank."""
    entries: dict[str, Any] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if isinstance(entry, ts_md.TensorStorageMetadata):
            entries[fqn] = dcp_tensor_entry(entry)
        else:
            entries[fqn] = dcp_md.BytesStorageMetadata()
    return dcp_md.Metadata(
        state_dict_metadata=entries,
        planner_data=dcp_mappings(md.planner_data, md.state_dict_metadata),
        storage_data=md,
        storage_meta=dcp_md.StorageMeta(),
    )


def dcp_mappings(planner_data: Any, fqns: Any) -> dict[str, tuple[Any, ...]]:
    """DCP's ``fqn -> path`` mappings from torchstow's recorded structure.

    DCP spells every dict key as a string and keeps integers for list
    indices, so integer keys of dicts become strings.
    """
    kinds = {tuple(path): kind for path, kind, _ in (planner_data or {}).get("containers", [])}
    mappings = {}
    for fqn, path in leaf_paths(planner_data, fqns).items():
        mappings[fqn] = tuple(
            str(elem) if isinstance(elem, int) and kinds.get(path[:depth]) not in (LIST, TUPLE) else elem
            for depth, elem in enumerate(path)
        )
    return mappings


def ts_write_item(item: dcp_plan.WriteItem, encoding: str = TORCH) -> ts_plan.WriteItem:
    """A DCP WriteItem as torchstow's."""
    index = ts_index(item.index)
    if item.type == dcp_plan.WriteItemType.BYTE_IO:
        return ts_plan.WriteItem(index, ts_plan.WriteItemType.BYTE_IO, None, ts_plan.BytesWriteData(encoding))
    td = item.tensor_data
    assert td is not None
    chunk = ts_md.ChunkStorageMetadata(torch.Size(td.chunk.offsets), torch.Size(td.chunk.sizes))
    kind = (
        ts_plan.WriteItemType.SHARD
        if item.type == dcp_plan.WriteItemType.SHARD
        else ts_plan.WriteItemType.TENSOR
    )
    data = ts_plan.TensorWriteData(chunk, ts_props(td.properties), torch.Size(td.size))
    return ts_plan.WriteItem(index, kind, data)


def dcp_write_item(item: ts_plan.WriteItem) -> dcp_plan.WriteItem:
    """A torchstow WriteItem as DCP's."""
    index = dcp_index(item.index)
    if item.type == ts_plan.WriteItemType.BYTE_IO:
        return dcp_plan.WriteItem(index=index, type=dcp_plan.WriteItemType.BYTE_IO)
    td = item.tensor_data
    assert td is not None
    kind = (
        dcp_plan.WriteItemType.SHARD
        if item.type == ts_plan.WriteItemType.SHARD
        else dcp_plan.WriteItemType.TENSOR
    )
    chunk = dcp_md.ChunkStorageMetadata(td.chunk.offsets, td.chunk.sizes)
    data = dcp_plan.TensorWriteData(chunk=chunk, properties=_dcp_props(td.properties), size=td.size)
    return dcp_plan.WriteItem(index=index, type=kind, tensor_data=data)


_TS_LOAD = {
    dcp_plan.LoadItemType.TENSOR: ts_plan.LoadItemType.TENSOR,
    dcp_plan.LoadItemType.BYTE_IO: ts_plan.LoadItemType.BYTE_IO,
}
_DCP_LOAD = {v: k for k, v in _TS_LOAD.items()}


def ts_read_item(item: dcp_plan.ReadItem) -> ts_plan.ReadItem:
    """A DCP ReadItem as torchstow's."""
    return ts_plan.ReadItem(
        _TS_LOAD[item.type],
        ts_index(item.dest_index),
        torch.Size(item.dest_offsets),
        ts_index(item.storage_index),
        torch.Size(item.storage_offsets),
        torch.Size(item.lengths),
    )


def dcp_read_item(item: ts_plan.ReadItem) -> dcp_plan.ReadItem:
    """A torchstow ReadItem as DCP's."""
    return dcp_plan.ReadItem(
        type=_DCP_LOAD[item.type],
        dest_index=dcp_index(item.dest_index),
        dest_offsets=item.dest_offsets,
        storage_index=dcp_index(item.storage_index),
        storage_offsets=item.storage_offsets,
        lengths=item.lengths,
    )


def ts_load_plan(plan: dcp.LoadPlan) -> ts_plan.LoadPlan:
    """A DCP LoadPlan as torchstow's (its planner and storage data travel as they are)."""
    return ts_plan.LoadPlan([ts_read_item(i) for i in plan.items], plan.storage_data, plan.planner_data)


def dcp_load_plan(plan: ts_plan.LoadPlan) -> dcp.LoadPlan:
    """A torchstow LoadPlan as DCP's."""
    return dcp.LoadPlan([dcp_read_item(i) for i in plan.items], plan.storage_data, plan.planner_data)
