"""Which chunks of a global tensor this rank holds: a plain tensor whole, a DTensor its shard."""

from __future__ import annotations

import functools
from typing import Any

import torch

from torchstow.core.dtensors import is_dtensor
from torchstow.core.planning.local_shards import shard_placement
from torchstow.format.manifest import ChunkStorageMetadata

__all__ = ["global_shape", "is_raw_tensor", "local_chunks"]


def local_chunks(value: torch.Tensor, fqn: str = "") -> list[tuple[ChunkStorageMetadata, torch.Tensor]]:
    """The chunks of the global tensor this rank holds, with their local data.

    A plain tensor is one whole chunk. A DTensor is its local shard, placed
    where the mesh and placements put it; a rank outside its mesh holds none.
    """
    if is_dtensor(value):
        return _dtensor_chunks(value, fqn)
    placed = shard_placement(value)
    if placed is not None:  # a DTensor's shard, sent without its DTensor (a writer process)
        if placed.offsets is None:
            return []
        return [(ChunkStorageMetadata(torch.Size(placed.offsets), value.shape), value)]
    return [(ChunkStorageMetadata(torch.Size((0,) * value.dim()), value.shape), value)]


def global_shape(value: torch.Tensor) -> torch.Size:
    """The shape of the global tensor ``value`` is part of: a DTensor's own, a placed shard's global one."""
    placed = shard_placement(value)
    return value.shape if placed is None else torch.Size(placed.global_size)


def _dtensor_chunks(value: Any, fqn: str) -> list[tuple[ChunkStorageMetadata, torch.Tensor]]:
    from torch.distributed.tensor import Partial

    placements = tuple(value.placements)
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(
            f"{fqn}: a DTensor with a Partial placement has no data of its own to save or load; "
            "redistribute it to Shard or Replicate first"
        )
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds none of the tensor
        return []
    chunk = _shard_chunk(tuple(value.shape), mesh, tuple(coordinate), placements)
    with torch.no_grad():  # to_local without autograd bookkeeping: the same memory, faster
        local = value.to_local()
    if local.shape != chunk.sizes:
        raise ValueError(
            f"{fqn}: the DTensor's local tensor has shape {list(local.shape)}, but its placements "
            f"{list(placements)} give this rank a shard of shape {list(chunk.sizes)}"
        )
    return [(chunk, local)]


@functools.lru_cache(maxsize=4096)
def _shard_chunk(
    shape: tuple[int, ...], mesh: Any, coordinate: tuple[int, ...], placements: tuple[Any, ...]
) -> ChunkStorageMetadata:
    """Where the shard at ``coordinate`` (this rank's place in ``mesh``) lies in the global tensor.

    Cached, with the coordinate in the key since the answer depends on it: a
    model's many tensors share a few shapes and placements, and torch's
    computation would otherwise dominate planning.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def is_raw_tensor(value: Any) -> bool:
    """Tensors whose bytes are written raw (dense, strided, not quantized)."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
    )
