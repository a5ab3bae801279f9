"""The fan-out of a read-once load: readers keep the bytes others need, every round
packs them into one buffer per rank, one exchange moves them, receivers place them.

The bytes a reader sends are what it committed into its own target, after its
storage reader verified their checksums; a receiver places them through its own
planner (``resolve_tensor`` then ``commit_tensor``), as if it had read them.
"""

from __future__ import annotations

import ctypes
import io
import socket
from collections.abc import Sequence
from typing import Any

import torch

from torchstow.core.layout.digest_memo import forget
from torchstow.core.planning import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torchstow.core.planning.read_once import ReadOnceProbe, ReadOnceRole, Share, segment_bytes
from torchstow.format import chunks as chunk_math
from torchstow.format.manifest import Metadata, TensorStorageMetadata

__all__ = ["KeepingPlanner", "pack_round", "place_round", "probe", "reads_of"]


def probe(planner: LoadPlanner, plan: LoadPlan, metadata: Metadata) -> ReadOnceProbe:
    """This rank's node and the keys it loads into another dtype than stored."""
    stored = metadata.state_dict_metadata
    casts: dict[str, torch.dtype] = {}
    seen: set[str] = set()
    for item in plan.items:
        fqn = item.dest_index.fqn
        if item.type != LoadItemType.TENSOR or fqn in seen:
            continue
        seen.add(fqn)
        entry = stored.get(item.storage_index.fqn)
        dtype = planner.resolve_tensor(item).dtype
        if isinstance(entry, TensorStorageMetadata) and dtype != entry.properties.dtype:
            casts[fqn] = dtype
    return ReadOnceProbe(socket.gethostname(), casts)


def reads_of(plan: LoadPlan, role: ReadOnceRole) -> LoadPlan:
    """What this rank reads from storage itself: its part of ``plan`` and the whole chunks
    it reads for others."""
    if role.reads is None and not role.chunks:
        return plan
    items = plan.items if role.reads is None else [plan.items[i] for i in role.reads]
    return LoadPlan(items + [whole for whole, _ in role.chunks], plan.storage_data, plan.planner_data)


class KeepingPlanner(LoadPlanner):
    """Passes every call to ``inner``, keeping a copy of the committed bytes of the items
    this rank sends to others, and reading whole chunks for others into scratch tensors."""

    def __init__(self, inner: LoadPlanner, plan: LoadPlan, role: ReadOnceRole) -> None:
        self.inner = inner
        self._slots = {plan.items[share.item]: n for n, share in enumerate(role.sends) if share.chunk is None}
        self.kept: list[torch.Tensor | None] = [None] * len(role.sends)
        self._wholes = {whole: n for n, (whole, _) in enumerate(role.chunks)}
        self._dtypes = [dtype for _, dtype in role.chunks]
        self.scratch: list[torch.Tensor | None] = [None] * len(role.chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def set_up_planner(self, state_dict: Any, metadata: Metadata, is_coordinator: bool = False) -> None:
        self.inner.set_up_planner(state_dict, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        return self.inner.create_local_plan()

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return self.inner.create_global_plan(global_plan)

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return self.inner.finish_plan(central_plan)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.inner.load_bytes(read_item, value)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        n = self._wholes.get(read_item)
        if n is None:
            return self.inner.resolve_tensor(read_item)
        scratch = self.scratch[n]
        if scratch is None:
            scratch = self.scratch[n] = torch.empty(read_item.lengths, dtype=self._dtypes[n])
        return scratch

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        if read_item in self._wholes:
            return
        slot = self._slots.get(read_item)
        if slot is not None:
            kept = torch.empty(tensor.shape, dtype=tensor.dtype)
            _copy(kept, tensor.detach())
            self.kept[slot] = kept.reshape(-1).view(torch.uint8)
        self.inner.commit_tensor(read_item, tensor)

    def place_local(self, plan: LoadPlan, role: ReadOnceRole) -> None:
        """Fill this rank's own items of the chunks it read whole."""
        for i, n in role.local:
            item = plan.items[i]
            scratch = self.scratch[n]
            assert scratch is not None
            target = self.inner.resolve_tensor(item)
            _copy(target, chunk_math.region(scratch, item.storage_offsets, item.lengths))
            self.inner.commit_tensor(item, target)

    def outgoing(self, n: int, share: Share) -> torch.Tensor | None:
        """The bytes of send ``n`` (None if it was never read)."""
        if share.chunk is None:
            return self.kept[n]
        number, offsets, lengths = share.chunk
        scratch = self.scratch[number]
        if scratch is None:
            return None
        return chunk_math.region(scratch, offsets, lengths).contiguous().reshape(-1).view(torch.uint8)


def pack_round(
    role: ReadOnceRole, round_no: int, keeping: KeepingPlanner | None, world_size: int
) -> tuple[torch.Tensor, list[int], list[int]]:
    """The buffer this rank sends in ``round_no`` (its parts in rank order), the bytes it
    sends to each rank and receives from each. Without ``keeping`` (this rank failed) the
    parts are zeros of the agreed sizes, so the exchange still completes everywhere."""
    parts: list[list[tuple[int, torch.Tensor | None]]] = [[] for _ in range(world_size)]
    for n, share in enumerate(role.sends):
        if share.round == round_no:
            data = keeping.outgoing(n, share) if keeping is not None else None
            if keeping is not None and data is None:
                raise RuntimeError(f"read-once: send {n} of this rank was never read")
            for dest in share.peers:
                parts[dest].append((share.nbytes, data))
    send_sizes = [sum(segment_bytes(nbytes) for nbytes, _ in part) for part in parts]
    recv_sizes = [0] * world_size
    for share in role.receives:
        if share.round == round_no:
            recv_sizes[share.peers[0]] += segment_bytes(share.nbytes)
    total = sum(send_sizes)
    fill = torch.empty if keeping is not None else torch.zeros  # padding is never read
    buffer = fill(total, dtype=torch.uint8)
    at = 0
    for part in parts:
        for nbytes, data in part:
            if data is not None:
                if data.numel() != nbytes:
                    raise RuntimeError(f"read-once: kept {data.numel()} bytes for a region of {nbytes}")
                _copy(buffer[at : at + nbytes], data)
            at += segment_bytes(nbytes)
    return buffer, send_sizes, recv_sizes


def place_round(
    role: ReadOnceRole,
    round_no: int,
    received: torch.Tensor,
    recv_sizes: Sequence[int],
    plan: LoadPlan,
    planner: LoadPlanner,
) -> None:
    """Put the regions received in ``round_no`` into their targets and commit them."""
    starts = [0] * len(recv_sizes)
    for src in range(1, len(recv_sizes)):
        starts[src] = starts[src - 1] + recv_sizes[src - 1]
    for share in role.receives:
        if share.round != round_no:
            continue
        src = share.peers[0]
        at = starts[src]
        starts[src] += segment_bytes(share.nbytes)
        item = plan.items[share.item]
        target = planner.resolve_tensor(item)
        if share.nbytes != target.numel() * target.dtype.itemsize:
            raise RuntimeError(
                f"read-once: {share.nbytes} bytes arrived for {item.dest_index.fqn}, "
                f"whose region holds {target.numel() * target.dtype.itemsize}"
            )
        _copy(target, received[at : at + share.nbytes].view(target.dtype).view(target.shape))
        planner.commit_tensor(item, target)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; between contiguous CPU tensors of one dtype a plain memory copy,
    which (unlike torch's copy) starts no intra-op threads: ranks sharing a machine's cores
    would otherwise spin against each other."""
    plain = (
        dst.is_cpu
        and src.is_cpu
        and dst.dtype == src.dtype
        and dst.is_contiguous()
        and src.is_contiguous()
        and not (dst.is_conj() or dst.is_neg() or src.is_conj() or src.is_neg())
    )
    if plain and dst.nbytes == src.nbytes:
        forget(dst)  # its bytes change without its version counter moving
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.nbytes)
        return
    with torch.no_grad():
        dst.copy_(src)
