"""The items of save and load plans, and the plans (DCP's vocabulary)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, TensorProperties

__all__ = [
    "BytesWriteData",
    "LoadItemType",
    "LoadPlan",
    "ReadItem",
    "SavePlan",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
]


class WriteItemType(Enum):
    """What a write item holds: a whole tensor, one shard of a tensor, or bytes."""

    TENSOR = "tensor"
    SHARD = "shard"
    BYTE_IO = "bytes"


class LoadItemType(Enum):
    """What a read item fills: a region of a tensor, or a non-tensor leaf."""

    TENSOR = "tensor"
    BYTE_IO = "bytes"


@dataclass(frozen=True)
class TensorWriteData:
    """The chunk of a tensor a write item covers, with the tensor's global shape."""

    chunk: ChunkStorageMetadata
    properties: TensorProperties
    size: torch.Size


@dataclass(frozen=True)
class BytesWriteData:
    """How a non-tensor leaf is encoded; ``value`` is set for inline JSON."""

    encoding: str
    value: Any = None


@dataclass(frozen=True)
class WriteItem:
    """One thing to write: a tensor chunk or a serialized object."""

    index: MetadataIndex
    type: WriteItemType
    tensor_data: TensorWriteData | None = None
    bytes_data: BytesWriteData | None = None

    def tensor_storage_size(self) -> int | None:
        """Bytes the item's tensor chunk occupies, or None for a non-tensor item."""
        if self.tensor_data is None:
            return None
        return math.prod(self.tensor_data.chunk.sizes) * self.tensor_data.properties.dtype.itemsize


@dataclass(frozen=True)
class ReadItem:
    """One region to read: ``lengths`` elements from a stored chunk into a target.

    ``storage_offsets`` are relative to the stored chunk, ``dest_offsets`` to
    the destination tensor (the local tensor or shard being loaded).
    """

    type: LoadItemType
    dest_index: MetadataIndex
    dest_offsets: torch.Size
    storage_index: MetadataIndex
    storage_offsets: torch.Size
    lengths: torch.Size


@dataclass(frozen=True)
class SavePlan:
    """The items one rank writes, plus data the planner and storage attach."""

    items: list[WriteItem]
    storage_data: Any = None
    planner_data: Any = None


@dataclass
class LoadPlan:
    """The items one rank reads, plus data the planner and storage attach."""

    items: list[ReadItem]
    storage_data: Any = None
    planner_data: Any = None
