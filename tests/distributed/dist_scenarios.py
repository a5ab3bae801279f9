"""Scenarios that every rank of a worker group runs together (see dist_pool.py).

Each function takes ``(rank, world_size, *args)`` and returns plain,
picklable values for the test to check. Values are deterministic functions
of their names and seeds, so a test knows what a checkpoint must hold
whatever world size and placement wrote or reads it.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import torchstow
import torchstow.planning
from torchstow.backends.faulty import current_rank
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.protocol.collective import ProcessGroupCollective
from torchstow.format.structure import flatten_state_dict
from torchstow.spi import ForwardingStorageReader, ForwardingStorageWriter
from torchstow.testing import state_differences

# Resharding the 2-D test meshes to check values is slow but fine; torch warns about it.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

# --------------------------------------------------------------------------- meshes and values

_MESHES: dict[tuple[int, ...], DeviceMesh] = {}
_GROUPS: dict[tuple[int, ...], Any] = {}


def mesh_for(world_size: int, layout: tuple[str, ...]) -> DeviceMesh:
    """The CPU mesh for ``layout``: 1-D over all ranks, or 2-D as (2, world_size // 2).

    Meshes are made once per process (making one is collective).
    """
    shape = (world_size,) if len(layout) == 1 else (2, world_size // 2)
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def placements(layout: tuple[str, ...], ndim: int) -> list[Placement]:
    """``"R"`` is Replicate, ``"S<d>"`` is Shard(d) (the last dim for tensors with fewer dims)."""
    return [Replicate() if p == "R" else Shard(min(int(p[1:]), ndim - 1)) for p in layout]


def values(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic float32 values for tensor ``name`` (not too tame: random normals)."""
    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    return torch.randn(shape, generator=gen)


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality (see torchstow.testing.state_differences)."""
    return not state_differences(a, b)


def full_values(state_dict: Any) -> dict[str, Any]:
    """Every leaf of a state dict by key, DTensors gathered to full tensors (collective)."""
    out = {}
    for fqn, leaf in flatten_state_dict(state_dict).leaves.items():
        if isinstance(leaf, DTensor):
            out[fqn] = leaf.full_tensor().clone()
        elif isinstance(leaf, torch.Tensor):
            out[fqn] = leaf.detach().clone()
        else:
            out[fqn] = leaf
    return out


def mismatches(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Where two flat state dicts differ, in any key order ([] when they match)."""
    return state_differences(expected, actual, ordered=False)


# --------------------------------------------------------------------------- a DTensor model + AdamW

PARAM_SHAPES = {
    "l1.weight": (10, 12),
    "l1.bias": (10,),
    "l2.weight": (7, 10),
    "l2.bias": (7,),
    "emb.weight": (2, 5),  # fewer rows than ranks: some shards are empty
}


def build_model(
    world_size: int, layout: tuple[str, ...], seed: int | None, lr: float
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model whose parameters are DTensors laid out by ``layout``, with AdamW.

    ``seed=None`` gives zeros (a target to load into). A plain buffer is
    replicated on every rank as an ordinary tensor.
    """
    mesh = mesh_for(world_size, layout)
    model = torch.nn.Module()
    model.l1 = torch.nn.Linear(12, 10)
    model.l2 = torch.nn.Linear(10, 7)
    model.emb = torch.nn.Embedding(2, 5)
    for name, shape in PARAM_SHAPES.items():
        full = torch.zeros(shape) if seed is None else values(name, shape, seed)
        dtensor = distribute_tensor(full, mesh, placements(layout, len(shape)), src_data_rank=None)
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(dtensor))
    model.register_buffer("scale", torch.full((3,), 0.0 if seed is None else 0.5 + seed))
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, optim


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int, seed: int | None) -> None:
    """``steps`` AdamW steps with deterministic gradients (zeros when ``seed`` is None)."""
    for step in range(steps):
        for name, param in model.named_parameters():
            full = (
                torch.zeros(param.shape) if seed is None else values(f"grad{step}.{name}", param.shape, seed)
            )
            param.grad = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        optim.step()
        optim.zero_grad()


def model_state(model: torch.nn.Module, optim: torch.optim.Optimizer, seed: int | None) -> dict[str, Any]:
    """Model, optimizer and a few non-tensor leaves (JSON and not)."""
    extra: dict[str, Any] = {"epoch": seed, "pair": None, "size": None}
    if seed is not None:
        extra = {"epoch": seed, "pair": (seed, "a"), "size": torch.Size([seed, 2])}
    return {"model": model.state_dict(), "optim": optim.state_dict(), "extra": extra}


def save_model(rank: int, world_size: int, uri: str, layout: tuple[str, ...], seed: int) -> Any:
    """Train a DTensor model two steps and save model + optimizer; rank 0 returns the full values."""
    model, optim = build_model(world_size, layout, seed, lr=0.01)
    train(model, optim, 2, seed)
    state = model_state(model, optim, seed)
    torchstow.save(state, uri, timeout=60)
    expected = full_values(state)
    return expected if rank == 0 else None


def load_model(
    rank: int, world_size: int, uri: str, layout: tuple[str, ...], expected: dict[str, Any]
) -> dict[str, Any]:
    """Load into a zero model of another layout; report mismatches and what the optimizer took."""
    model, optim = build_model(world_size, layout, None, lr=0.5)
    train(model, optim, 1, None)  # creates the optimizer state to load into
    state = model_state(model, optim, None)
    before = mismatches(expected, full_values(state))
    torchstow.load(state, uri, timeout=60)
    actual = full_values(state)
    optim.load_state_dict(state["optim"])
    return {
        "before": before,
        "mismatches": mismatches(expected, actual),
        "lr": optim.param_groups[0]["lr"],
        "step": float(optim.state[optim.param_groups[0]["params"][0]]["step"]),
        "weight_placements": str(tuple(model.l1.weight.placements)),
    }


# --------------------------------------------------------------------------- failures


class _FailingPlanner:
    """Raises in ``create_local_plan`` or ``create_global_plan`` on some ranks (a mixin
    for the default save and load planners)."""

    def __init__(self, at: str, ranks: set[int], exc: type[Exception], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_at = at
        self.fail_ranks = ranks
        self.exc = exc

    def _maybe_fail(self, where: str) -> None:
        if where == self.fail_at and current_rank() in self.fail_ranks:
            raise self.exc(f"planner fault in {where} on rank {current_rank()}")

    def create_local_plan(self) -> Any:
        self._maybe_fail("create_local_plan")
        return super().create_local_plan()  # type: ignore[misc]

    def create_global_plan(self, plans: Any) -> Any:
        self._maybe_fail("create_global_plan")
        return super().create_global_plan(plans)  # type: ignore[misc]


class FailingSavePlanner(_FailingPlanner, torchstow.planning.DefaultSavePlanner):
    """A save planner that fails where it is told."""


class FailingLoadPlanner(_FailingPlanner, torchstow.planning.DefaultLoadPlanner):
    """A load planner that fails where it is told."""


EXCEPTIONS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "OSError": OSError,
    "RuntimeError": RuntimeError,
}


def small_state(rank: int, world_size: int, distributed: bool) -> dict[str, Any]:
    """A replicated tensor, a tensor sharded over the ranks, and non-tensor leaves."""
    full = values("sharded", (2 * world_size, 3), 1)
    if distributed:
        sharded: torch.Tensor = distribute_tensor(
            full, mesh_for(world_size, ("S0",)), [Shard(0)], src_data_rank=None
        )
    else:
        sharded = full
    return {"shared": torch.arange(6.0), "sharded": sharded, "meta": {"epoch": 1, "pair": (1, 2)}}


def summarize(exc: torchstow.CheckpointException) -> dict[str, Any]:
    """What a test checks of a CheckpointException, in picklable form."""
    failures = {}
    for failed_rank, (error, stack) in exc.failures.items():
        failures[failed_rank] = {
            "type": type(error).__name__,
            "builtin": next((name for name, cls in EXCEPTIONS.items() if type(error) is cls), None),
            "message": str(error),
            "frames": [frame.name for frame in stack],
            "files": [os.path.basename(frame.filename) for frame in stack],
        }
    return {
        "class": type(exc).__name__,
        "timeout": isinstance(exc, torchstow.CheckpointTimeoutError),
        "message": str(exc),
        "failures": failures,
    }


def outcome(call: Callable[[], object]) -> dict[str, Any]:
    """What ``call`` raised on this rank, in picklable form (``{"ok": True}`` if nothing)."""
    try:
        call()
    except torchstow.CheckpointException as error:
        return summarize(error)
    except Exception as error:
        return {"class": type(error).__name__, "message": str(error), "failures": {}}
    return {"ok": True}


def fault_case(
    rank: int,
    world_size: int,
    path: str,
    op: str,
    step: str,
    mode: str,
    exc: str,
    fault_ranks: list[int],
    coordinator: int,
    no_dist: bool = False,
) -> dict[str, Any]:
    """Save (or save cleanly, then load) with a fault at ``step`` on ``fault_ranks``.

    ``step`` is a storage step (injected through the faulty backend) or
    ``planner.<method>`` (a failing planner). Returns ``{"ok": True}`` or
    the summary of the CheckpointException this rank raised.
    """
    distributed = not no_dist
    state = small_state(rank, world_size, distributed)
    ranks = ",".join(map(str, fault_ranks))
    kwargs: dict[str, Any] = {"coordinator_rank": coordinator, "no_dist": no_dist, "timeout": 60}
    uri = f"file://{path}"
    if step.startswith("planner."):
        cls: Any = FailingSavePlanner if op == "save" else FailingLoadPlanner
        kwargs["planner"] = cls(step.split(".", 1)[1], set(fault_ranks), EXCEPTIONS[exc])
    else:
        uri = f"faulty+file://{path}?fail={step}&ranks={ranks}&mode={mode}&exc={exc}"
    try:
        if op == "save":
            torchstow.save(state, uri, **kwargs)
        else:
            torchstow.save(state, path, coordinator_rank=coordinator, no_dist=no_dist)
            target = small_state(rank, world_size, distributed)
            torchstow.load(target, uri, **kwargs)
            if not same(target["sharded"], state["sharded"]) or target["meta"] != state["meta"]:
                return {"ok": False, "wrong values": True}
    except torchstow.CheckpointException as error:
        return summarize(error)
    return {"ok": True}


def unpicklable_failure(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Rank 1's planner raises an exception of a local class (which cannot be pickled)."""

    class LocalError(Exception):
        pass

    class Planner(torchstow.planning.DefaultSavePlanner):
        def create_local_plan(self) -> Any:
            if rank == 1:
                raise LocalError("a local exception class on rank 1")
            return super().create_local_plan()

    try:
        torchstow.save(small_state(rank, world_size, True), path, planner=Planner(), timeout=60)
    except torchstow.CheckpointException as exc:
        out = summarize(exc)
        error = exc.failures[1][0]
        out["is_original"] = isinstance(error, LocalError)
        out["remote"] = isinstance(error, torchstow.RemoteError)
        out["remote_traceback"] = getattr(error, "remote_traceback", "")
        return out
    return {"ok": True}


class _RaisingStateful:
    """A Stateful whose ``state_dict()`` raises (a per-rank failure before any collective)."""

    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("state_dict() failed on this rank")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def fails_before_the_protocol(rank: int, world_size: int, path: str, op: str, victim: int) -> dict[str, Any]:
    """``op`` (save, async_save, load) in which ``victim`` fails while its call prepares,
    before the protocol's first collective: a user metadata that is not JSON (passed on
    that rank only), a Stateful whose ``state_dict()`` raises, a planner of no known kind;
    ``victim`` -1: every rank. Returns what this rank raised, as for :func:`fault_case`."""
    state = small_state(rank, world_size, True)
    mine = victim in (rank, -1)
    kwargs: dict[str, Any] = {"timeout": 30}
    if op == "load":
        torchstow.save(state, path, timeout=30)
        state = small_state(rank, world_size, True)
        if mine:
            kwargs["planner"] = "not a planner"
    elif op == "save":
        kwargs["metadata"] = {"epoch": object()} if mine else None
    elif mine:
        state["thing"] = _RaisingStateful()

    def run() -> None:
        if op == "save":
            torchstow.save(state, path, **kwargs)
        elif op == "async_save":
            torchstow.async_save(state, path, **kwargs).result(timeout=60)
        else:
            torchstow.load(state, path, **kwargs)

    return outcome(run)


class _PlanDroppingSavePlanner(torchstow.planning.DefaultSavePlanner):
    """A faulty planner whose global plan has one plan fewer than there are ranks."""

    def create_global_plan(self, all_plans: Any) -> Any:
        plans, metadata = super().create_global_plan(all_plans)
        return plans[:-1], metadata


def save_with_a_plan_missing(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Save with a planner whose global plan leaves out the last rank; what this rank raised."""
    state = small_state(rank, world_size, True)
    return outcome(lambda: torchstow.save(state, path, planner=_PlanDroppingSavePlanner(), timeout=30))


class PluginError(torchstow.errors.TorchstowError):
    """A plugin's own torchstow error, whose constructor takes more than a message."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


class _PluginErrorPlanner(torchstow.planning.DefaultSavePlanner):
    def create_local_plan(self) -> Any:
        if dist.get_rank() == 1:
            raise PluginError("the plugin refused", 7)
        return super().create_local_plan()


def plugin_error_on_rank_1(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Save where rank 1's planning raises a plugin's TorchstowError subclass; what each rank raised."""
    state = small_state(rank, world_size, True)
    return outcome(lambda: torchstow.save(state, path, planner=_PluginErrorPlanner(), timeout=30))


def _plugin_data() -> str:
    if dist.get_rank() != 0:
        raise ModuleNotFoundError("No module named 'site_plugin' (installed on rank 0 only)")
    return "plugin data"


class _PluginData:
    """Unpickles on rank 0 only, as a plugin's class installed on one node would."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_plugin_data, ())


class _ManifestWithPluginData(ForwardingStorageWriter):
    """Commits, then holds in the returned manifest a value only rank 0 can unpickle."""

    def finish(self, metadata: Any, results: Any) -> None:
        self.inner.finish(metadata, results)
        metadata.planner_data = _PluginData()


def committed_manifest_unreadable_on_rank_1(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Each rank saves a tensor of its own; the committed manifest the coordinator sends
    back does not unpickle on rank 1. Whether this rank's save returned, and its notes."""
    writer = _ManifestWithPluginData(torchstow.storage_writer(path))
    try:
        torchstow.save({f"w{rank}": torch.arange(1024.0) + rank}, storage_writer=writer, timeout=60)
    except torchstow.CheckpointException as exc:
        return {"ok": False, "notes": list(getattr(exc, "__notes__", []))}
    return {"ok": True, "notes": []}


class _SavePlannerWithPluginData(torchstow.planning.DefaultSavePlanner):
    """Attaches to rank 1's global plan a value only rank 0 can unpickle."""

    def create_global_plan(self, all_plans: Any) -> Any:
        plans, metadata = super().create_global_plan(all_plans)
        plans[1] = dataclasses.replace(plans[1], planner_data=_PluginData())
        return plans, metadata


class _LoadPlannerWithPluginData(torchstow.planning.DefaultLoadPlanner):
    """Attaches to rank 1's global plan a value only rank 0 can unpickle."""

    def create_global_plan(self, global_plan: Any) -> Any:
        plans = list(super().create_global_plan(global_plan))
        plans[1] = dataclasses.replace(plans[1], planner_data=_PluginData())
        return plans


class _ManifestReadWithPluginData(ForwardingStorageReader):
    """Reads the manifest, then holds in it a value only rank 0 can unpickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = self.inner.read_metadata(*args, **kwargs)
        metadata.planner_data = _PluginData()
        return metadata


def unpicklable_on_rank_1(rank: int, world_size: int, path: str, op: str, timeout: float) -> dict[str, Any]:
    """A value the coordinator sends does not unpickle on rank 1: in the save's (or async
    save's) planning scatter, the load's manifest broadcast, or the load's planning scatter.
    What this rank raised, and after how long."""
    state = {f"w{rank}": torch.arange(256.0) + rank, "shared": torch.arange(64.0)}
    start = time.monotonic()
    try:
        if op == "save":
            planner = _SavePlannerWithPluginData(enable_plan_caching=False)
            torchstow.save(state, path, planner=planner, timeout=timeout)
        elif op == "async_save":
            planner = _SavePlannerWithPluginData(enable_plan_caching=False)
            torchstow.async_save(state, path, planner=planner, timeout=timeout).result()
        else:
            torchstow.save(state, path, timeout=timeout)
            if op == "load-metadata":
                reader = _ManifestReadWithPluginData(torchstow.storage_reader(path))
                torchstow.load(state, storage_reader=reader, timeout=timeout)
            else:
                torchstow.load(state, path, planner=_LoadPlannerWithPluginData(), timeout=timeout)
    except torchstow.CheckpointException as exc:
        out = summarize(exc)
        out["elapsed"] = time.monotonic() - start
        return out
    return {"ok": True, "elapsed": time.monotonic() - start}


class PreemptedError(Exception):
    """What a scenario's SIGALRM handler raises to stop a save."""


def save_after_a_hung_interrupted_publish(rank: int, world_size: int, path: str, timeout: float) -> Any:
    """On the coordinator (rank 0), a SIGALRM handler stops a save while its manifest is
    being published, and that publish then hangs (held for 30 s at most). Every rank then
    saves to the same location again with ``timeout=``: what each save raised on this
    rank. The hung publish is let go at the end."""
    import signal
    import threading

    from torchstow.format.files import MANIFEST

    original = LocalFileStore.publish
    held, hung = threading.Event(), threading.Event()

    def publish(self: LocalFileStore, name: str, data: bytes) -> None:
        if name == MANIFEST and not hung.is_set():
            hung.set()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
            held.wait(30.0)
        original(self, name, data)

    def on_alarm(signum: int, frame: Any) -> None:
        raise PreemptedError("SIGALRM: stop")

    state = {f"w{rank}": torch.arange(64.0) + rank}
    previous = signal.signal(signal.SIGALRM, on_alarm) if rank == 0 else None
    if rank == 0:
        LocalFileStore.publish = publish  # type: ignore[method-assign]
    try:
        first = outcome(lambda: torchstow.save(state, path, overwrite=True, timeout=timeout))
        later = outcome(lambda: torchstow.save(state, path, overwrite=True, timeout=timeout))
    finally:
        if rank == 0:
            held.set()
            LocalFileStore.publish = original  # type: ignore[method-assign]
            signal.signal(signal.SIGALRM, previous)
            for thread in threading.enumerate():
                if thread.name == "torchstow-commit":
                    thread.join()
    return first, later


def async_commit_timeouts(rank: int, world_size: int, path: str) -> list[tuple[float | None, float]]:
    """For an async save with ``timeout=7`` and without one: the seconds its commit
    collective waits at most, and the timeout its private gloo group was made with (a
    fresh pipeline, so the group is made here); then an async save with 7 s commits."""
    from torchstow.checkpointing.async_save import AsyncSavePipeline

    found = []
    for timeout in (7, None):
        coll = AsyncSavePipeline().commit_collective(None, 0, None, timeout)
        assert isinstance(coll, ProcessGroupCollective)
        made = coll.group._get_backend(torch.device("cpu")).options._timeout
        found.append((coll.timeout.total_seconds() if coll.timeout else None, made.total_seconds()))
    torchstow.async_save({f"w{rank}": torch.arange(8.0)}, path, timeout=7).result()
    return found


def async_commit_group_with_a_straggler(rank: int, world_size: int, late: float) -> bytes:
    """Rank 1 reaches its first async save ``late`` seconds after rank 0, each passing
    ``timeout=1``: the commit group is made all the same (a fresh pipeline, so it is made
    here), and a broadcast on it arrives (under a timeout that load cannot exceed)."""
    from torchstow.checkpointing.async_save import AsyncSavePipeline

    if rank == 1:
        time.sleep(late)
    coll = AsyncSavePipeline().commit_collective(None, 0, None, 1)
    assert isinstance(coll, ProcessGroupCollective)
    return ProcessGroupCollective(coll.group, 0, 30).broadcast(b"made" if rank == 0 else None, "straggler")


def async_save_without_a_peer(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Rank 0's first async save on a group (its timeout then 2 s) that rank 1 never joins:
    what it raised (its commit group is made on this first save) and how long it waited; then
    what a ReplicationStager on that group (2 s) raised, as ``"replication"``."""
    from torchstow.checkpointing.replication import ReplicationStager

    group = dist.new_group(backend="gloo")
    if rank == 1:
        return {"skipped": True}
    group._get_backend(torch.device("cpu")).set_timeout(datetime.timedelta(seconds=2))
    start = time.monotonic()
    out = outcome(lambda: torchstow.async_save({"w": torch.ones(4)}, path, process_group=group, timeout=1))
    elapsed = time.monotonic() - start
    replication = outcome(lambda: ReplicationStager(group, timeout=2, storage_dir=f"{path}-replicas"))
    return {**out, "elapsed": elapsed, "replication": replication}


def timed_fault(
    rank: int,
    world_size: int,
    path: str,
    op: str,
    step: str,
    mode: str,
    victim: int,
    coordinator: int,
    timeout: float,
) -> dict[str, Any]:
    """A save or load in which ``victim`` is killed, exits or hangs at ``step``.

    The survivors report how they failed and how long they waited.
    """
    state = {"shared": torch.arange(64.0), "meta": {"epoch": 1}}
    uri = f"faulty+file://{path}?fail={step}&ranks={victim}&mode={mode}&code=7"
    start = time.monotonic()
    try:
        if op == "save":
            torchstow.save(state, uri, coordinator_rank=coordinator, timeout=timeout)
        elif op == "async_save":
            torchstow.async_save(state, uri, coordinator_rank=coordinator, timeout=timeout).result()
        else:
            torchstow.load(state, uri, coordinator_rank=coordinator, timeout=timeout)
    except torchstow.CheckpointException as exc:
        out = summarize(exc)
        out["elapsed"] = time.monotonic() - start
        return out
    return {"ok": True, "elapsed": time.monotonic() - start}


# --------------------------------------------------------------------------- dedup, subgroups, collectives


def replicated_save(rank: int, world_size: int, path: str) -> None:
    """Every rank holds the same 8 tensors and 8 non-JSON objects, plus a JSON leaf."""
    state = {
        "layers": {f"w{i}": values(f"w{i}", (64, 256), 3) for i in range(8)},
        "objects": {f"o{i}": (i, "x" * (i + 1)) for i in range(8)},
        "epoch": 5,
    }
    torchstow.save(state, path, timeout=60)


def _subgroups(world_size: int) -> list[Any]:
    """Groups of the even and the odd ranks (made once: making a group is collective)."""
    key = (world_size,)
    if key not in _GROUPS:
        _GROUPS[key] = [dist.new_group(list(range(parity, world_size, 2))) for parity in (0, 1)]
    return list(_GROUPS[key])


def subgroup_round_trip(rank: int, world_size: int, root: str, victim: int | None) -> dict[str, Any]:
    """Even and odd ranks each save and load their own checkpoint at once, in their own
    subgroup, with group rank 1 as coordinator; ``victim`` (a global rank) fails its write."""
    group = _subgroups(world_size)[rank % 2]
    group_rank = dist.get_rank(group)
    name = f"group{rank % 2}"
    state = {
        "shared": torch.arange(8.0) + rank % 2,
        f"part{group_rank}": values(f"{name}.{group_rank}", (4,), 2),
    }
    victims = victim if victim is not None else -1
    uri = f"faulty+file://{root}/{name}?fail=write_data&ranks={victims}&exc=OSError"
    try:
        torchstow.save(state, uri, process_group=group, coordinator_rank=1, timeout=60)
    except torchstow.CheckpointException as exc:
        return {"group": name, "saved": False, **summarize(exc)}
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    torchstow.load(
        target, f"{root}/{name}", process_group=group, coordinator_rank=1, strict=False, timeout=60
    )
    return {"group": name, "saved": True, "loaded": [k for k in state if same(state[k], target[k])]}


@contextmanager
def _counting(counts: Counter[str]) -> Iterator[None]:
    """Count the collectives ProcessGroupCollective runs."""
    originals = {name: getattr(ProcessGroupCollective, name) for name in ("gather", "scatter", "broadcast")}

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(ProcessGroupCollective, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ProcessGroupCollective, name, fn)


def count_collectives(rank: int, world_size: int, path: str, num_tensors: int) -> dict[str, dict[str, int]]:
    """How many collectives a save and a load of ``num_tensors`` sharded tensors take
    (with NumPy unavailable)."""
    mesh = mesh_for(world_size, ("S0",))
    state = {
        f"t{i}": distribute_tensor(values(f"t{i}", (8, 4), 4), mesh, [Shard(0)], src_data_rank=None)
        for i in range(num_tensors)
    }
    saves: Counter[str] = Counter()
    loads: Counter[str] = Counter()
    with _counting(saves), _without_numpy():
        torchstow.save(state, path, timeout=60)
    with _counting(loads), _without_numpy():
        torchstow.load(state, path, timeout=60)
    return {"save": dict(saves), "load": dict(loads)}


@contextmanager
def _without_numpy() -> Iterator[None]:
    """Make ``Tensor.numpy`` fail, as it does where NumPy is not installed
    (torch's own object collectives need it; torchstow must not)."""
    original = torch.Tensor.numpy

    def unavailable(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Numpy is not available")

    torch.Tensor.numpy = unavailable  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.numpy = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- partial reads


def _arange_2d(rows: int, cols: int) -> torch.Tensor:
    return torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)


def big_save(rank: int, world_size: int, path: str, rows: int, cols: int) -> None:
    """One large float32 tensor, Shard(0) over the ranks."""
    mesh = mesh_for(world_size, ("S0",))
    tensor = distribute_tensor(_arange_2d(rows, cols), mesh, [Shard(0)], src_data_rank=None)
    torchstow.save({"big": tensor}, path, storage_options={"fsync": False}, timeout=60)


def big_load_counting(rank: int, world_size: int, path: str, rows: int, cols: int) -> dict[str, Any]:
    """Load the large tensor Shard(0) over this world size, counting the bytes read from files."""
    mesh = mesh_for(world_size, ("S0",))
    target = distribute_tensor(torch.zeros(rows, cols), mesh, [Shard(0)], src_data_rank=None)
    read_bytes = 0
    original = LocalFileStore.read_in_order

    def counting(self: LocalFileStore, name: str, requests: Any, landed: Any) -> None:
        nonlocal read_bytes
        read_bytes += sum(len(buf) for _, buf in requests)
        original(self, name, requests, landed)

    LocalFileStore.read_in_order = counting  # type: ignore[method-assign]
    try:
        torchstow.load({"big": target}, path, timeout=60)
    finally:
        LocalFileStore.read_in_order = original  # type: ignore[method-assign]
    local = target.to_local()
    full = _arange_2d(rows, cols)
    start = rank * math.ceil(rows / world_size)
    return {
        "read_bytes": read_bytes,
        "needed_bytes": local.numel() * 4,
        "correct": same(local, full[start : start + local.shape[0]]),
    }


# --------------------------------------------------------------------------- CUDA


def cuda_round_trip(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Save CUDA DTensors Shard(0) and load them as Shard(1), over a cpu:gloo,cuda:nccl group.

    Every rank uses device 0 and no NCCL collective runs: checkpoints only use
    the group's CPU backend, and the values are checked shard by shard.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    torch.cuda.set_device(0)
    mesh = init_device_mesh("cuda", (world_size,))
    full = values("w", (10, 6), 5)
    source = distribute_tensor(full.cuda(), mesh, [Shard(0)], src_data_rank=None)
    torchstow.save({"w": source, "step": 3}, path, timeout=60)
    target = distribute_tensor(torch.zeros(10, 6, device="cuda"), mesh, [Shard(1)], src_data_rank=None)
    state = {"w": target, "step": 0}
    torchstow.load(state, path, timeout=60)
    sizes, offsets = compute_local_shape_and_global_offset(target.shape, mesh, target.placements)
    expected = full[:, offsets[1] : offsets[1] + sizes[1]]
    local = target.to_local()
    return {"device": local.device.type, "same": same(local.cpu(), expected), "step": state["step"]}


def nccl_only_timeout(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """In a gloo world, a subgroup with only NCCL: timeout= is refused, a plain save works."""
    torch.cuda.set_device(0)
    group = dist.new_group(list(range(world_size)), backend="nccl")
    state = {"w": torch.arange(4.0, device="cuda")}
    try:
        torchstow.save(state, path, process_group=group, timeout=10)
        error = ""
    except ValueError as exc:
        error = str(exc)
    torchstow.save(state, path, process_group=group, overwrite=True)
    return {
        "timeout_error": error,
        "saved_without_timeout": same(torchstow.read(path)["w"], state["w"].cpu()),
    }


def saves_after_a_timed_out_save(rank: int, world_size: int, path: str) -> list[dict[str, Any]]:
    """Two saves on a gloo group of their own: in the first, rank 1 comes 2.5 s late under
    ``timeout=1`` (rank 0 gives up, and gloo closes the group's connections); the second, on
    time, fails at once on both. What each raised, and how long the second took."""
    group = dist.new_group(backend="gloo")
    if rank == 1:
        time.sleep(2.5)
    state = {"w": torch.ones(4)}
    first = outcome(lambda: torchstow.save(state, f"{path}-1", process_group=group, timeout=1))
    dist.barrier()  # on the pool's own group, which is sound
    start = time.monotonic()
    second = outcome(lambda: torchstow.save(state, f"{path}-2", process_group=group, timeout=30))
    return [first, {**second, "elapsed": time.monotonic() - start}]


def async_saves_after_a_timed_out_one(rank: int, world_size: int, path: str) -> list[dict[str, Any]]:
    """Three async saves: the first on time (the commit group is made, or reused); in the
    second, rank 1 writes its data 2.5 s late under ``timeout=1`` (rank 0 gives up, and gloo
    closes the commit group); the third, on time. What the second and third raised, and how
    long the third took."""
    state = {f"w{rank}": torch.arange(4.0) + rank}
    torchstow.async_save(state, f"{path}-0", timeout=30).result()
    slow = f"faulty+file://{path}-1?fail=write_data&ranks=1&mode=delay&seconds=2.5"
    first = outcome(lambda: torchstow.async_save(state, slow, timeout=1).result())
    dist.barrier()  # on the pool's own group, which is sound
    start = time.monotonic()
    second = outcome(lambda: torchstow.async_save(state, f"{path}-2", timeout=30).result())
    return [first, {**second, "elapsed": time.monotonic() - start}]


def manifest_directory_sync_fails(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Each rank saves a tensor of its own; on the coordinator, syncing the directory fails
    (EIO) once the manifest is in place. What each rank raised, its notes, and its files."""
    import errno

    from torchstow.backends import filesystem

    real = filesystem._fsync_dir

    def fsync_dir(where: str) -> None:
        if os.path.exists(os.path.join(where, "manifest.json")):
            raise OSError(errno.EIO, "Input/output error")
        real(where)

    filesystem._fsync_dir = fsync_dir
    out: dict[str, Any] = {"ok": True, "notes": []}
    try:
        torchstow.save({f"w{rank}": torch.arange(8.0) + rank}, path, timeout=60)
    except torchstow.CheckpointException as exc:
        out = {**summarize(exc), "notes": list(getattr(exc, "__notes__", []))}
    finally:
        filesystem._fsync_dir = real
    mine = [n for n in os.listdir(path) if n.startswith("data-") and n.split("-")[2] == str(rank)]
    return {**out, "files": mine}
