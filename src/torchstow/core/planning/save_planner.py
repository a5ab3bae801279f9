"""Save and load plans, their items, and the planners that make them.

The vocabulary follows torch.distributed.checkpoint: a :class:`SavePlanner`
turns a state dict into :class:`WriteItem` s, a :class:`LoadPlanner` turns a
manifest and a state dict into :class:`ReadItem` s, and storage backends move
the bytes. The default planners flatten nested containers, store non-tensor
leaves inline as JSON where possible, and intersect stored chunks with the
chunks a rank holds so a checkpoint loads across world sizes and placements.
"""

from __future__ import annotations

import abc
import functools
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from torchstow.core.dtensors import is_dtensor
from torchstow.errors import StateDictMismatchError
from torchstow.format import chunks as chunk_math
from torchstow.format.leaves import (
    JSON,
    check_unpickling_allowed,
    decode_object,
    encode_object,
    is_json_value,
)
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
    dtype_name,
)
from torchstow.format.structure import flatten_state_dict, set_leaf

__all__ = [
    "BytesWriteData",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
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
    usable: bool = True


@dataclass
class LoadPlan:
    """The items one rank reads, plus data the planner and storage attach."""

    items: list[ReadItem]
    storage_data: Any = None
    planner_data: Any = None


class SavePlanner(abc.ABC):
    """Turns a state dict into write items, on every rank and on the coordinator.

    Call order in a save: ``set_up_planner``, ``create_local_plan`` (every
    rank), ``create_global_plan`` (coordinator), ``finish_plan`` (every rank),
    then ``resolve_data`` for each item while the storage writes.
    """

    @abc.abstractmethod
    def set_up_planner(
        self,
        state_dict: Mapping[str, Any],
        storage_meta: Any = None,
        is_coordinator: bool = False,
    ) -> None:
        """Take the state dict this rank saves."""

    @abc.abstractmethod
    def create_local_plan(self) -> SavePlan:
        """The items this rank would write."""

    @abc.abstractmethod
    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """On the coordinator: final plans for every rank and the checkpoint's metadata."""

    @abc.abstractmethod
    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """Accept the coordinator's plan for this rank."""

    @abc.abstractmethod
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        """The tensor (chunk) or serialized bytes for ``write_item``."""


class LoadPlanner(abc.ABC):
    """Turns a manifest and a state dict into read items, and receives the data.

    Call order in a load: ``set_up_planner``, ``create_local_plan``,
    ``create_global_plan`` (coordinator), ``finish_plan``, then per item
    ``load_bytes`` or ``resolve_tensor`` + ``commit_tensor``.
    """

    @abc.abstractmethod
    def set_up_planner(
        self, state_dict: Mapping[str, Any], metadata: Metadata, is_coordinator: bool = False
    ) -> None:
        """Take the state dict to fill and the checkpoint's metadata."""

    @abc.abstractmethod
    def create_local_plan(self) -> LoadPlan:
        """The items this rank needs."""

    @abc.abstractmethod
    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: adjust every rank's plan."""

    @abc.abstractmethod
    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        """Accept the coordinator's plan for this rank."""

    @abc.abstractmethod
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Receive the serialized bytes of a non-tensor leaf."""

    @abc.abstractmethod
    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        """The tensor (a view of the destination) that ``read_item`` fills."""

    @abc.abstractmethod
    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Called once ``tensor`` (from :meth:`resolve_tensor`) holds the data."""


def local_chunks(value: torch.Tensor, fqn: str = "") -> list[tuple[ChunkStorageMetadata, torch.Tensor]]:
    """The chunks of the global tensor this rank holds, with their local data.

    A plain tensor is one whole chunk. A DTensor is its local shard, placed
    where the mesh and placements put it; a rank outside its mesh holds none.
    """
    if is_dtensor(value):
        return _dtensor_chunks(value, fqn)
    return [(ChunkStorageMetadata(torch.Size((0,) * value.dim()), value.shape), value)]


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


def global_shape(value: torch.Tensor) -> torch.Size:
    """The shape of the whole (global) tensor ``value`` is part of (a DTensor's shape is global)."""
    return value.shape


def _is_raw_tensor(value: Any) -> bool:
    """Tensors whose bytes are written raw (dense, strided, not quantized)."""
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
    )


class DefaultSavePlanner(SavePlanner):
    """Flattens the state dict; writes tensors raw and non-tensor leaves as JSON or bytes.

    ``allow_pickle`` lets leaves that only full pickle can restore be saved.
    ``dedup_replicated_tensors`` drops duplicates of items that several ranks
    hold identically, keeping one copy balanced across ranks.
    """

    def __init__(
        self,
        *,
        flatten_state_dict: bool = True,
        dedup_replicated_tensors: bool = True,
        allow_pickle: bool = False,
    ) -> None:
        if not flatten_state_dict:
            raise ValueError("torchstow's DefaultSavePlanner always flattens the state dict")
        self.dedup_replicated_tensors = dedup_replicated_tensors
        self.allow_pickle = allow_pickle
        self._chunk_data: dict[tuple[Any, ...], TensorWriteData] = {}
        self._tensors: dict[MetadataIndex, torch.Tensor] = {}
        self._payloads: dict[str, bytes] = {}
        self.plan: SavePlan | None = None

    def set_up_planner(
        self,
        state_dict: Mapping[str, Any],
        storage_meta: Any = None,
        is_coordinator: bool = False,
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
            if _is_raw_tensor(value):
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
        if self.dedup_replicated_tensors and len(all_plans) > 1:
            all_plans = dedup_save_plans(all_plans)
        entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        final_plans = []
        for plan in all_plans:
            kept = []
            for item in plan.items:
                fqn = item.index.fqn
                if item.tensor_data is not None:
                    td = item.tensor_data
                    entry = entries.get(fqn)
                    if entry is None:
                        entry = entries[fqn] = TensorStorageMetadata(td.properties, td.size, [])
                    elif not isinstance(entry, TensorStorageMetadata):
                        raise ValueError(f"{fqn} is a tensor on one rank and an object on another")
                    elif entry.size != td.size or entry.properties.dtype != td.properties.dtype:
                        raise ValueError(
                            f"{fqn}: ranks disagree on the tensor: shape {list(entry.size)} "
                            f"{dtype_name(entry.properties.dtype)} vs {list(td.size)} "
                            f"{dtype_name(td.properties.dtype)}"
                        )
                    entry.chunks.append(td.chunk)
                    kept.append(item)
                else:
                    assert item.bytes_data is not None
                    bd = item.bytes_data
                    entries[fqn] = BytesStorageMetadata(bd.encoding, bd.value)
                    if bd.encoding != JSON:
                        kept.append(item)
            final_plans.append(SavePlan(kept, plan.storage_data, plan.planner_data, plan.usable))
        for fqn, entry in entries.items():
            if isinstance(entry, TensorStorageMetadata):
                chunk_math.validate_cover(fqn, entry.size, entry.chunks)
        planner_data = merge_planner_data([p.planner_data for p in all_plans])
        return final_plans, Metadata(state_dict_metadata=entries, planner_data=planner_data)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._payloads[write_item.index.fqn])
        return self._tensors[write_item.index].detach()


def dedup_save_plans(all_plans: list[SavePlan]) -> list[SavePlan]:
    """Keep one copy of each item that several ranks would write.

    An item held by several ranks goes to the one with the fewest bytes
    assigned so far (then the fewest items, for objects whose size is not
    known before they are written), so replicated data is spread instead
    of piling on rank 0. Linear in the number of items, plus a sort of the
    shared ones.
    """
    holders: dict[MetadataIndex, list[int]] = {}
    sizes: dict[MetadataIndex, int] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            holders.setdefault(item.index, []).append(rank)
            sizes[item.index] = item.tensor_storage_size() or 0
    load = [0] * len(all_plans)
    count = [0] * len(all_plans)
    owner: dict[MetadataIndex, int] = {}
    shared: list[tuple[int, MetadataIndex, list[int]]] = []
    for index, ranks in holders.items():
        if len(ranks) == 1:
            owner[index] = ranks[0]
            load[ranks[0]] += sizes[index]
            count[ranks[0]] += 1
        else:
            shared.append((sizes[index], index, ranks))
    shared.sort(key=lambda entry: -entry[0])
    for size, index, ranks in shared:
        best = min(ranks, key=lambda r: (load[r], count[r]))
        owner[index] = best
        load[best] += size
        count[best] += 1
    return [
        SavePlan(
            [item for item in plan.items if owner[item.index] == rank],
            plan.storage_data,
            plan.planner_data,
            plan.usable,
        )
        for rank, plan in enumerate(all_plans)
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


def _read_items_for(
    fqn: str,
    dest_index: MetadataIndex,
    dest: ChunkStorageMetadata,
    stored: list[ChunkStorageMetadata],
) -> list[ReadItem]:
    """Read items that fill ``dest`` (a chunk this rank holds) from the stored chunks."""
    items = []
    for i, chunk in enumerate(stored):
        if chunk.offsets == dest.offsets and chunk.sizes == dest.sizes:
            zeros = torch.Size((0,) * len(dest.sizes))
            storage_index = MetadataIndex(fqn, chunk.offsets, i)
            return [ReadItem(LoadItemType.TENSOR, dest_index, zeros, storage_index, zeros, dest.sizes)]
        hit = chunk_math.overlap(dest, chunk)
        if hit is not None:
            dest_offsets, storage_offsets, lengths = hit
            storage_index = MetadataIndex(fqn, chunk.offsets, i)
            items.append(
                ReadItem(
                    LoadItemType.TENSOR, dest_index, dest_offsets, storage_index, storage_offsets, lengths
                )
            )
    return items


class DefaultLoadPlanner(LoadPlanner):
    """Fills a state dict in place from a checkpoint, resharding as needed.

    ``strict`` (default) rejects keys missing from the checkpoint, keys the
    checkpoint has that the state dict lacks, and dtype mismatches, naming
    each. With ``strict=False`` such keys are skipped and a tensor of another
    dtype is cast on load. A shape mismatch is always an error.
    """

    def __init__(
        self, *, flatten_state_dict: bool = True, strict: bool = True, allow_pickle: bool = False
    ) -> None:
        if not flatten_state_dict:
            raise ValueError("torchstow's DefaultLoadPlanner always flattens the state dict")
        self.strict = strict
        self.allow_pickle = allow_pickle
        self.missing_keys: list[str] = []
        self.unexpected_keys: list[str] = []

    def set_up_planner(
        self, state_dict: Mapping[str, Any], metadata: Metadata, is_coordinator: bool = False
    ) -> None:
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator
        flat = flatten_state_dict(state_dict)
        self.paths = flat.paths
        self.leaves = flat.leaves
        stored = metadata.state_dict_metadata
        self.missing_keys = [k for k in flat.leaves if k not in stored]
        self.unexpected_keys = [k for k in stored if k not in flat.leaves]
        problems = []
        for fqn, value in flat.leaves.items():
            entry = stored.get(fqn)
            if entry is None:
                continue
            problem = self._mismatch(fqn, value, entry)
            if problem:
                problems.append(problem)
        hard = [p for p, is_hard in problems if is_hard or self.strict]
        if self.strict and (self.missing_keys or self.unexpected_keys):
            lines = [f"missing from the checkpoint: {k}" for k in self.missing_keys]
            lines += [f"in the checkpoint but not the state dict: {k}" for k in self.unexpected_keys]
            hard = lines + hard
        if hard:
            raise StateDictMismatchError(
                "the state dict does not match the checkpoint:\n  "
                + "\n  ".join(hard)
                + ("\n(pass strict=False to load only the matching keys)" if self.strict else ""),
                missing_keys=self.missing_keys,
                unexpected_keys=self.unexpected_keys,
                mismatched=[p for p, _ in problems],
            )
        for fqn in flat.leaves:
            entry = stored.get(fqn)
            if isinstance(entry, BytesStorageMetadata):
                check_unpickling_allowed(fqn, entry.encoding, allow_pickle=self.allow_pickle)

    @staticmethod
    def _mismatch(fqn: str, value: Any, entry: Any) -> tuple[str, bool] | None:
        """(description, always an error) when ``value`` cannot take ``entry``."""
        is_tensor = isinstance(entry, TensorStorageMetadata)
        if is_tensor != _is_raw_tensor(value):
            want = "a tensor" if is_tensor else "a non-tensor value"
            return f"{fqn}: the checkpoint holds {want}, the state dict a {type(value).__name__}", True
        if not is_tensor:
            return None
        shape = global_shape(value)
        if shape != entry.size:
            return f"{fqn}: shape {list(entry.size)} in the checkpoint, {list(shape)} in the state dict", True
        if value.dtype != entry.properties.dtype:
            return (
                f"{fqn}: dtype {dtype_name(entry.properties.dtype)} in the checkpoint, "
                f"{dtype_name(value.dtype)} in the state dict",
                False,
            )
        return None

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        items: list[ReadItem] = []
        self._targets: dict[MetadataIndex, torch.Tensor] = {}
        for fqn, value in self.leaves.items():
            entry = stored.get(fqn)
            if entry is None:
                continue
            if isinstance(entry, TensorStorageMetadata):
                for chunk, local in local_chunks(value, fqn):
                    dest_index = MetadataIndex(fqn, chunk.offsets)
                    self._targets[dest_index] = local.detach()
                    items.extend(_read_items_for(fqn, dest_index, chunk, entry.chunks))
            elif entry.encoding == JSON:
                self.state_dict = set_leaf(self.state_dict, self.paths[fqn], entry.value)
            else:
                index = MetadataIndex(fqn)
                items.append(
                    ReadItem(LoadItemType.BYTE_IO, index, torch.Size(), index, torch.Size(), torch.Size())
                )
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        entry = self.metadata.state_dict_metadata[fqn]
        assert isinstance(entry, BytesStorageMetadata)
        obj = decode_object(fqn, entry.encoding, value.getvalue(), allow_pickle=self.allow_pickle)
        self.state_dict = set_leaf(self.state_dict, self.paths[fqn], obj)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self._targets[read_item.dest_index]
        if read_item.lengths == target.shape:
            return target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass
