"""The fan-out of a read-once load: a thread reads this rank's part, in the order of its
sends; as each region it sends is read (and its checksums verified), the transfer that
carries it starts, while the next part is read. Receivers start their transfers into
the target tensors themselves, so a region moves from the reader's memory into the
receivers' with no copy where both are plain contiguous CPU tensors (small regions
travel packed, large ones alone).

Every rank starts the transfers it takes part in in the coordinator's order (see
:mod:`torchstow.core.planning.read_once`), then waits for them all; a receiver
then commits the regions through its own planner (``resolve_tensor`` then
``commit_tensor``), as if it had read them. A region read in parts by several
ranks lands part by part in the target its planner resolved once, and is
committed once, after the fan-out.
"""

from __future__ import annotations

import ctypes
import io
import socket
import threading
from typing import Any

import torch

from torchstow.core.futures import wait_future
from torchstow.core.layout.digest_memo import forget
from torchstow.core.planning import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torchstow.core.planning.read_once import ReadOnceProbe, ReadOnceRole, Share, piece_item, segment_bytes
from torchstow.core.protocol.collective import Collective
from torchstow.core.protocol.failures import CapturedFailure, capture
from torchstow.core.storage.interfaces import StorageReader
from torchstow.format import chunks as chunk_math
from torchstow.format.manifest import Metadata, TensorStorageMetadata

__all__ = ["KeepingPlanner", "fan_out", "place_received", "probe", "read_order"]


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


def read_order(plan: LoadPlan, role: ReadOnceRole) -> LoadPlan:
    """What this rank reads from storage itself: its part of ``plan`` and the whole chunks it
    reads for others, what it sends first first."""
    reads = range(len(plan.items)) if role.reads is None else role.reads
    order: list[ReadItem] = []
    sent: set[int] = set()
    wholes: set[int] = set()
    for share in role.sends:
        if share.chunk is not None:
            if share.chunk[0] not in wholes:
                wholes.add(share.chunk[0])
                order.append(role.chunks[share.chunk[0]][0])
        elif share.part is not None:
            order.append(piece_item(plan.items[share.item], share.part))
        elif share.item not in sent:
            sent.add(share.item)
            order.append(plan.items[share.item])
    order += [whole for n, (whole, _) in enumerate(role.chunks) if n not in wholes]
    order += [plan.items[i] for i in reads if i not in sent]
    return LoadPlan(order, plan.storage_data, plan.planner_data)


class KeepingPlanner(LoadPlanner):
    """Passes every call to ``inner``, holding on to the committed tensors of the items this
    rank sends to others (a contiguous copy only where one is not contiguous), and reading
    whole chunks for others into scratch tensors; waiters learn when each is there.

    Parts of an item (read here, or received) land in the item's target, resolved once
    through ``inner``; a part read here is not committed to ``inner``: the whole item is,
    once, by :func:`place_received`."""

    def __init__(self, inner: LoadPlanner, plan: LoadPlan, role: ReadOnceRole) -> None:
        self.inner = inner
        self.plan = plan
        self._slots: dict[ReadItem, int] = {}
        self._parts: dict[ReadItem, Share] = {}
        for n, share in enumerate(role.sends):
            if share.part is not None:
                read = piece_item(plan.items[share.item], share.part)
                self._parts[read] = share
                self._slots[read] = n
            elif share.chunk is None:
                self._slots[plan.items[share.item]] = n
        self._targets: dict[int, torch.Tensor] = {}
        self.kept: list[torch.Tensor | None] = [None] * len(role.sends)
        self._wholes = {whole: n for n, (whole, _) in enumerate(role.chunks)}
        self._dtypes = [dtype for _, dtype in role.chunks]
        self.scratch: list[torch.Tensor | None] = [None] * len(role.chunks)
        self._read = [False] * len(role.chunks)
        self._changed = threading.Condition()
        self.done = False  # the reads ended, read or failed

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

    def target(self, share: Share) -> torch.Tensor:
        """Where the region of ``share`` goes: its item's target, or its part of it."""
        if share.part is None:
            return self.inner.resolve_tensor(self.plan.items[share.item])
        whole = self._targets.get(share.item)
        if whole is None:
            whole = self._targets[share.item] = self.inner.resolve_tensor(self.plan.items[share.item])
        return chunk_math.region(whole, *share.part)

    def assembled(self) -> list[tuple[ReadItem, torch.Tensor]]:
        """The items whose parts landed in their targets, with them."""
        return [(self.plan.items[i], target) for i, target in sorted(self._targets.items())]

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        part = self._parts.get(read_item)
        if part is not None:
            return self.target(part)
        n = self._wholes.get(read_item)
        if n is None:
            return self.inner.resolve_tensor(read_item)
        scratch = self.scratch[n]
        if scratch is None:
            scratch = self.scratch[n] = torch.empty(read_item.lengths, dtype=self._dtypes[n])
        return scratch

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        n = self._wholes.get(read_item)
        if n is not None:
            with self._changed:
                self._read[n] = True
                self._changed.notify_all()
            return
        if read_item not in self._parts:
            self.inner.commit_tensor(read_item, tensor)
        slot = self._slots.get(read_item)
        if slot is not None:
            kept = _raw(tensor)
            if kept is None:  # not plain contiguous memory: a copy that is
                copy = torch.empty(tensor.shape, dtype=tensor.dtype)
                _copy(copy, tensor.detach())
                kept = _raw(copy)
            with self._changed:
                self.kept[slot] = kept
                self._changed.notify_all()

    def end(self) -> None:
        """No more reads: wake whoever waits for bytes that will not come."""
        with self._changed:
            self.done = True
            self._changed.notify_all()

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
        """The bytes of send ``n`` once read (flat uint8), waiting for them while reads go on;
        None if they were never read."""
        with self._changed:
            self._changed.wait_for(lambda: self.done or self._ready(n, share))
            if not self._ready(n, share):
                return None
        if share.chunk is None:
            return self.kept[n]
        number, offsets, lengths = share.chunk
        scratch = self.scratch[number]
        assert scratch is not None
        region = chunk_math.region(scratch, offsets, lengths)
        raw = _raw(region)
        return raw if raw is not None else _raw(region.contiguous())

    def _ready(self, n: int, share: Share) -> bool:
        return self.kept[n] is not None if share.chunk is None else self._read[share.chunk[0]]


def fan_out(
    coll: Collective,
    storage_reader: StorageReader,
    planner: LoadPlanner,
    plan: LoadPlan,
    role: ReadOnceRole,
    step: str,
) -> CapturedFailure | None:
    """Read this rank's part and move the shared regions: the first failure of this rank
    (reading, or placing what it received), or None. Every transfer runs whatever fails,
    zeros standing in for bytes this rank could not read, so no rank waits forever; a
    rank that loses contact with the others raises CheckpointTimeoutError."""
    keeping = KeepingPlanner(planner, plan, role)
    by_transfer: list[list[tuple[int, Share]]] = [[] for _ in role.transfers]
    for n, share in enumerate(role.sends):
        by_transfer[share.transfer].append((n, share))
    incoming = capture(lambda: _incoming(role, keeping))
    failures: list[CapturedFailure] = [incoming] if isinstance(incoming, CapturedFailure) else []

    def read() -> None:
        wait_future(storage_reader.read_data(planner.finish_plan(read_order(plan, role)), keeping))
        keeping.place_local(plan, role)

    def reading() -> None:
        outcome = capture(read)
        if isinstance(outcome, CapturedFailure):
            failures.append(outcome)
        keeping.end()

    thread = threading.Thread(target=reading, name="torchstow-read-once", daemon=True)
    thread.start()
    try:
        pending = []
        for number, transfer in enumerate(role.transfers):
            if transfer.source == coll.rank:
                sends = by_transfer[number]
                buffer = capture(lambda: _outgoing(keeping, sends, transfer.nbytes, failures))  # noqa: B023
                if isinstance(buffer, CapturedFailure):  # the transfer still runs, with zeros
                    failures.append(buffer)
                    buffer = torch.zeros(transfer.nbytes, dtype=torch.uint8)
            elif isinstance(incoming, CapturedFailure):
                buffer = torch.empty(transfer.nbytes, dtype=torch.uint8)
            else:
                buffer = incoming[number]
            pending.append(coll.transfer(buffer, transfer.source, transfer.peers, step))
        for transfer_pending in pending:
            coll.wait(transfer_pending, step)
    finally:
        thread.join()
    if failures:
        return failures[0]
    assert not isinstance(incoming, CapturedFailure)
    placed = capture(lambda: place_received(role, incoming, keeping))
    return placed if isinstance(placed, CapturedFailure) else None


def _outgoing(
    keeping: KeepingPlanner, sends: list[tuple[int, Share]], nbytes: int, failures: list[CapturedFailure]
) -> torch.Tensor:
    """The buffer of one transfer this rank sends: a region's own bytes where it travels
    alone, else the regions packed; zeros for what was never read (a failure is noted)."""
    parts = []
    for n, share in sends:
        data = keeping.outgoing(n, share)
        if data is None and not failures:
            failures.append(CapturedFailure(RuntimeError(f"read-once: send {n} of this rank was never read")))
        if data is not None and data.numel() != share.nbytes:
            wrong = f"read-once: kept {data.numel()} bytes for a region of {share.nbytes}"
            failures.append(CapturedFailure(RuntimeError(wrong)))
            data = None
        parts.append((share.nbytes, data))
    if len(parts) == 1 and parts[0][1] is not None:
        return parts[0][1]
    buffer = torch.zeros(nbytes, dtype=torch.uint8)
    at = 0
    for size, data in parts:
        if data is not None:
            _copy(buffer[at : at + size], data)
        at += segment_bytes(size)
    return buffer


def _incoming(role: ReadOnceRole, keeping: KeepingPlanner) -> list[torch.Tensor | None]:
    """The buffer each transfer this rank receives lands in (None for its own sends): the
    target's own memory where one region travels alone into a plain contiguous target."""
    alone: dict[int, list[Share]] = {}
    for share in role.receives:
        alone.setdefault(share.transfer, []).append(share)
    buffers: list[torch.Tensor | None] = []
    for number, transfer in enumerate(role.transfers):
        shares = alone.get(number)
        if shares is None:
            buffers.append(None)
            continue
        direct = None
        if len(shares) == 1:
            target = keeping.target(shares[0])
            direct = _raw(target)
            if direct is not None and direct.numel() == transfer.nbytes:
                forget(target)  # its bytes change without its version counter moving
            else:
                direct = None
        buffers.append(direct if direct is not None else torch.empty(transfer.nbytes, dtype=torch.uint8))
    return buffers


def place_received(role: ReadOnceRole, buffers: list[torch.Tensor | None], keeping: KeepingPlanner) -> None:
    """Put the regions received into their targets (where they did not land there) and
    commit them; then commit each item assembled from parts, once."""
    at = [0] * len(role.transfers)
    for share in role.receives:
        buffer = buffers[share.transfer]
        assert buffer is not None
        start = at[share.transfer]
        at[share.transfer] += segment_bytes(share.nbytes)
        item = keeping.plan.items[share.item]
        target = keeping.target(share)
        if share.nbytes != target.numel() * target.dtype.itemsize:
            raise RuntimeError(
                f"read-once: {share.nbytes} bytes arrived for {item.dest_index.fqn}, "
                f"whose region holds {target.numel() * target.dtype.itemsize}"
            )
        raw = _raw(target)
        if raw is None or raw.data_ptr() != buffer.data_ptr() + start:
            _copy(target, buffer[start : start + share.nbytes].view(target.dtype).view(target.shape))
        if share.part is None:
            keeping.inner.commit_tensor(item, target)
    for item, target in keeping.assembled():
        keeping.inner.commit_tensor(item, target)


def _raw(tensor: torch.Tensor) -> torch.Tensor | None:
    """The bytes of ``tensor`` as a flat uint8 tensor over the same memory, where its memory
    holds exactly its values (a contiguous CPU tensor, no conjugate or negative bit)."""
    if not (tensor.is_cpu and tensor.is_contiguous()) or tensor.is_conj() or tensor.is_neg():
        return None
    return tensor.detach().reshape(-1).view(torch.uint8)


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
