"""Scenarios for read-once loads, run on every rank of a worker group (see dist_pool.py).

Each load goes through a storage reader whose byte store counts the data bytes it
reads, so a test can add up what every rank read from storage.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from dist_scenarios import (
    build_model,
    full_values,
    mesh_for,
    mismatches,
    model_state,
    placements,
    summarize,
    train,
    values,
)
from torch.distributed.tensor import DTensor, distribute_tensor

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout import reader as reader_module
from torchstow.core.layout.reader import LayoutReader
from torchstow.core.planning import DefaultLoadPlanner
from torchstow.core.storage.forwarding import ForwardingByteStore
from torchstow.testing.counting import CountingStore

#: (name, shape, dtype) of the tensors in every scenario's state.
TENSORS = [(f"w{i}", (16, 64), torch.float32) for i in range(8)] + [
    ("half", (8, 40), torch.bfloat16),
    ("ids", (33,), torch.int64),
    ("mask", (7, 3), torch.bool),
    ("scalar", (), torch.float64),
]


def expected(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic values of ``dtype`` for tensor ``name``, the same on every rank."""
    base = values(name, shape, seed)
    if dtype == torch.bool:
        return base > 0
    if dtype == torch.int64:
        return (base * 1000).to(torch.int64)
    return base.to(dtype)


def make_state(world_size: int, layout: str, seed: int | None) -> dict[str, Any]:
    """The scenario state: plain tensors (``"plain"``: every rank holds all of it) or DTensors
    laid out by ``layout`` (``"S0"``, ``"R"``, ``"R,S0"``...); zeros when ``seed`` is None."""
    state: dict[str, Any] = {"meta": {"epoch": 3}}
    for name, shape, dtype in TENSORS:
        full = expected(name, shape, dtype, seed) if seed is not None else torch.zeros(shape, dtype=dtype)
        if layout == "plain" or not shape:
            state[name] = full
        else:
            parts = tuple(layout.split(","))
            mesh = mesh_for(world_size, parts)
            state[name] = distribute_tensor(full, mesh, placements(parts, len(shape)), src_data_rank=None)
    return state


def _differences(state: dict[str, Any], seed: int) -> list[str]:
    wrong = []
    for name, shape, dtype in TENSORS:
        value = state[name]
        full = value.full_tensor() if isinstance(value, DTensor) else value
        want = expected(name, shape, dtype, seed)
        if full.dtype != dtype or not torch.equal(
            full.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
        ):
            wrong.append(name)
    if state["meta"] != {"epoch": 3}:
        wrong.append("meta")
    return wrong


def save_state(rank: int, world_size: int, uri: str, layout: str, seed: int) -> int:
    """Save the scenario state; the data bytes the checkpoint stores."""
    torchstow.save(make_state(world_size, layout, seed), uri, timeout=60)
    metadata = torchstow.storage_reader(uri).read_metadata()
    return sum(info.length for info in metadata.storage_data.values())


def counted_load(
    rank: int, world_size: int, uri: str, layout: str, seed: int, read_once: bool
) -> dict[str, Any]:
    """Load into zeros laid out by ``layout``; the data bytes this rank read and what differs."""
    state = make_state(world_size, layout, None)
    counting = CountingStore(LocalFileStore(uri, uri))
    reader = LayoutReader(counting)
    torchstow.load(state, storage_reader=reader, read_once=read_once, timeout=60)
    return {"read": counting.data_bytes, "wrong": _differences(state, seed)}


def failing_load(rank: int, world_size: int, uri: str, layout: str) -> dict[str, Any]:
    """A load expected to fail: the CheckpointException this rank raised, summarized."""
    state = make_state(world_size, layout, None)
    try:
        torchstow.load(state, uri, timeout=30)
    except torchstow.CheckpointException as exc:
        return summarize(exc)
    return {"ok": True}


def load_and_resave(
    rank: int, world_size: int, src: str, dst: str, layout: tuple[str, ...], expected: dict[str, Any]
) -> list[str]:
    """Load a model checkpoint into a zero model laid out by ``layout``, save it again to
    ``dst`` from this world size; where the loaded values differ from ``expected``."""
    model, optim = build_model(world_size, layout, None, lr=0.5)
    train(model, optim, 1, None)  # creates the optimizer state to load into
    state = model_state(model, optim, None)
    torchstow.load(state, src, timeout=60)
    torchstow.save(state, dst, timeout=60)
    return mismatches(expected, full_values(state))


class _LastCommitFails(DefaultLoadPlanner):
    """Raises when committing its last item: in a read-once load of a replicated state,
    an item it received, placed during the fan-out."""

    def create_local_plan(self) -> Any:
        plan = super().create_local_plan()
        self.left = len(plan.items)
        return plan

    def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
        self.left -= 1
        if self.left == 0:
            raise RuntimeError(f"injected failure placing {read_item.dest_index.fqn}")
        super().commit_tensor(read_item, tensor)


def failing_fan_out(rank: int, world_size: int, uri: str, victim: int) -> dict[str, Any]:
    """A read-once load in which ``victim`` fails placing a region it received."""
    state = make_state(world_size, "plain", None)
    planner = _LastCommitFails() if rank == victim else None
    try:
        torchstow.load(state, uri, planner=planner, timeout=30)
    except torchstow.CheckpointException as exc:
        return summarize(exc)
    return {"ok": True}


class GatedStore(ForwardingByteStore):
    """Reads ``free`` bytes, then reads more only once the file ``gate`` exists (waiting at
    most ``patience`` seconds, then raising TimeoutError)."""

    def __init__(self, inner: Any, free: int, gate: str, patience: float = 20.0) -> None:
        super().__init__(inner)
        self.free = free
        self.gate = gate
        self.patience = patience
        self.read_bytes = 0

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        if self.read_bytes >= self.free:
            deadline = time.monotonic() + self.patience
            while not os.path.exists(self.gate):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.gate} did not appear: reads waited for sends that never came")
                time.sleep(0.005)
        self.read_bytes += sum(len(buf) for _, buf in requests)
        super().read_into(name, requests)


#: Bytes of each tensor of the pipelined scenario (large enough to travel alone).
BIG = 2 << 20


def big_state(seed: int | None) -> dict[str, torch.Tensor]:
    """Four tensors of BIG bytes, each full of its own value (zeros when ``seed`` is None)."""
    return {
        f"big{i}": torch.full((BIG // 4,), 0.0 if seed is None else float(seed + i), dtype=torch.float32)
        for i in range(4)
    }


def pipelined_load(rank: int, world_size: int, uri: str, gates: str, seed: int) -> list[str]:
    """A read-once load of :func:`big_state` on 2 ranks in which a rank reads its first
    tensor, then reads on only once the other rank has received a tensor from it (the other
    rank watches its own tensors and opens the gate): it passes only if each rank sends what
    it has read while it still has more to read. The reader's batches (what it commits at
    once) are cut to one tensor here. What differs after the load."""
    want = big_state(seed)
    state = big_state(None)
    stop = threading.Event()

    def watch() -> None:  # mine: the one tensor I may read before the gate; another one came
        while not stop.is_set():
            if sum(torch.equal(state[name], want[name]) for name in state) >= 2:
                open(os.path.join(gates, f"{rank}-received"), "w").close()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    store = GatedStore(LocalFileStore(uri, uri), BIG, os.path.join(gates, f"{1 - rank}-received"))
    batch = reader_module._BATCH_BYTES
    reader_module._BATCH_BYTES = BIG
    try:
        torchstow.load(state, storage_reader=LayoutReader(store, thread_count=1), timeout=60)
    finally:
        reader_module._BATCH_BYTES = batch
        stop.set()
        watcher.join()
    return [name for name in state if not torch.equal(state[name], want[name])]


def failing_send(rank: int, world_size: int, uri: str, victim: int) -> dict[str, Any]:
    """A read-once load in which ``victim`` fails building a buffer it sends (as when its
    memory runs out), after reading."""
    from torchstow.core.protocol import fan_out

    state = make_state(world_size, "plain", None)
    outgoing = fan_out._outgoing

    def failing(*args: Any) -> Any:
        raise MemoryError("injected failure building a send")

    if rank == victim:
        fan_out._outgoing = failing  # type: ignore[assignment]
    try:
        torchstow.load(state, uri, timeout=30)
    except torchstow.CheckpointException as exc:
        return summarize(exc)
    finally:
        fan_out._outgoing = outgoing  # type: ignore[assignment]
    return {"ok": True}


#: Shape of the one large tensor of the split scenarios: 16 MiB, four 4 MiB checksum blocks.
LARGE = (1024, 4096)


def large_state(seed: int | None) -> dict[str, torch.Tensor]:
    """One large float32 tensor (zeros when ``seed`` is None)."""
    return {"emb": torch.zeros(LARGE) if seed is None else values("emb", LARGE, seed)}


def split_load(
    rank: int, world_size: int, uri: str, seed: int, part_bytes: int, strided: int = -1
) -> dict[str, Any]:
    """A read-once load of :func:`large_state` with shared regions read in parts of at least
    ``part_bytes`` (rank ``strided`` loading into a transposed view, not contiguous): the data
    bytes this rank read and whether the value is bit-exact, or the CheckpointException it
    raised, summarized."""
    from torchstow.core.planning import read_once

    state = large_state(None)
    if rank == strided:
        state["emb"] = torch.zeros(LARGE[::-1]).t()
    counting = CountingStore(LocalFileStore(uri, uri))
    split = read_once.SPLIT_BYTES
    read_once.SPLIT_BYTES = part_bytes
    try:
        torchstow.load(state, storage_reader=LayoutReader(counting), timeout=30)
    except torchstow.CheckpointException as exc:
        return summarize(exc)
    finally:
        read_once.SPLIT_BYTES = split
    want = large_state(seed)["emb"]
    exact = torch.equal(state["emb"].view(torch.int32), want.view(torch.int32))
    return {"read": counting.data_bytes, "exact": exact}
