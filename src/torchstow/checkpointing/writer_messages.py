"""The messages between a trainer and its checkpoint writer process.

Requests go trainer -> writer, one response comes back per request, in
order. A write request carries the state dict's structure pickled with its
tensors replaced by :class:`~torchstow.core.staging.tensor_pickle.TensorView` s of shared-memory
segments (:mod:`torchstow.core.staging.arena`): the tensor bytes stay where staging
put them.
"""

from __future__ import annotations

import ctypes
from collections.abc import MutableSet
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from torchstow.core.planning.geometry import local_chunks
from torchstow.core.planning.local_shards import ShardPlacement
from torchstow.core.protocol.failures import CapturedFailure
from torchstow.core.staging.arena import SegmentMapper, SharedMemoryArena, ShmRef, locate_shared
from torchstow.core.staging.tensor_pickle import dumps_tensor_views, loads_tensor_views

__all__ = [
    "PingRequest",
    "Request",
    "RequestKind",
    "Response",
    "TerminateRequest",
    "WriteRequest",
    "pack_state_dict",
    "unpack_state_dict",
]


class RequestKind(Enum):
    """What a request asks the writer process to do."""

    PING = "ping"  # answer once started (the start-up handshake)
    WRITE = "write"  # write a state dict as this rank's part of a checkpoint
    TERMINATE = "terminate"  # answer, then exit


@dataclass(frozen=True)
class PingRequest:
    """Answered as soon as the writer is ready."""

    request_id: int
    kind: ClassVar[RequestKind] = RequestKind.PING


@dataclass(frozen=True)
class WriteRequest:
    """Write ``state_dict`` (pickled, tensors as views of shared memory) under ``path``.

    ``released_segments`` are segments the trainer has freed since the last
    request: the writer unmaps them. ``failure``: the trainer could not stage
    or pack this rank's state dict (``state_dict`` is then empty); the writer
    still takes part in the write, as a failed rank, so that every rank fails
    it as one.
    """

    request_id: int
    path: str
    state_dict: bytes
    kwargs: dict[str, Any]
    released_segments: tuple[str, ...] = ()
    failure: CapturedFailure | None = None
    kind: ClassVar[RequestKind] = RequestKind.WRITE


@dataclass(frozen=True)
class TerminateRequest:
    """Answered, then the writer process exits."""

    request_id: int
    kind: ClassVar[RequestKind] = RequestKind.TERMINATE


Request = PingRequest | WriteRequest | TerminateRequest


@dataclass(frozen=True)
class Response:
    """The answer to request ``request_id``: ``ok``, or the ``error`` it raised."""

    kind: RequestKind
    request_id: int
    ok: bool
    error: CapturedFailure | None = None
    info: dict[str, Any] = field(default_factory=dict)


def pack_state_dict(
    state_dict: Any,
    arena: SharedMemoryArena | None = None,
    *,
    copy_unshared: bool = False,
    arenas_used: MutableSet[SharedMemoryArena] | None = None,
) -> bytes:
    """``state_dict`` pickled with each tensor as a view of its shared-memory segment.

    Segments are looked up in ``arena``, or in every arena of this process
    when it is None. DTensors travel as their local shard, marked with where
    it lies in the global tensor (the writer has no device mesh), so the
    checkpoint holds the global tensors. A tensor in no segment raises
    ValueError (stage with shared memory first), unless ``copy_unshared``:
    then its storage's bytes travel in the message. The arenas found are
    added to ``arenas_used``.
    """

    def segment(tensor: torch.Tensor) -> ShmRef | bytes:
        where = None
        if tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            if arena is not None:
                where = arena.locate(storage)
            else:
                found = locate_shared(storage)
                if found is not None:
                    if arenas_used is not None:
                        arenas_used.add(found[0])
                    where = found[1]
            if where is None and copy_unshared and tensor.device.type == "cpu":
                return ctypes.string_at(storage.data_ptr(), storage.nbytes()) if storage.nbytes() else b""
        if where is None:
            raise ValueError(
                f"a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device} of the state dict is not "
                "in the stager's shared memory; the writer process reads staged tensors from shared "
                "memory only (stage with use_shared_memory=True)"
            )
        return where

    return dumps_tensor_views(state_dict, segment, dtensor_placement=dtensor_placement)


def dtensor_placement(dtensor: torch.Tensor) -> ShardPlacement:
    """Where this rank's shard of ``dtensor`` lies in the global tensor."""
    chunks = local_chunks(dtensor)
    offsets = tuple(chunks[0][0].offsets) if chunks else None
    return ShardPlacement(tuple(dtensor.shape), offsets)


def unpack_state_dict(data: bytes, segments: SegmentMapper) -> Any:
    """The state dict :func:`pack_state_dict` packed, its tensors viewing the shared segments."""
    storages: dict[ShmRef, torch.UntypedStorage] = {}

    def storage(ref: ShmRef | bytes) -> torch.UntypedStorage:
        if isinstance(ref, bytes):  # a tensor that was not in shared memory travelled by value
            return (
                torch.UntypedStorage.from_buffer(ref, dtype=torch.uint8) if ref else torch.UntypedStorage(0)
            )
        found = storages.get(ref)
        if found is None:
            found = storages[ref] = segments.storage(ref)
        return found

    return loads_tensor_views(data, storage)
