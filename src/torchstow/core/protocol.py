"""The save and load protocols: local plans, a global plan on the coordinator,
every rank moves its bytes, the coordinator commits.

Each step runs on every rank with its failures captured; the outcomes meet on
the coordinator, and if any rank failed, every rank raises the same
:class:`CheckpointException` naming each failed rank and its exception.
"""

from __future__ import annotations

import gc
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torchstow.core.collective import Collective, SingleProcess
from torchstow.core.errors import CheckpointException, Failure
from torchstow.core.metadata import Metadata
from torchstow.core.planning import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torchstow.core.storage import StorageReader, StorageWriter, WriteResult, wait_future

__all__ = ["load_state_dict", "save_state_dict"]


class _Failed:
    """What travels between ranks when a step failed somewhere."""

    __slots__ = ("failures",)

    def __init__(self, failures: dict[int, Failure]) -> None:
        self.failures = failures


class _LocalFailure:
    __slots__ = ("exc", "stack")

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.stack = traceback.extract_tb(exc.__traceback__)


def _capture(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return _LocalFailure(exc)


def _failures_of(outcomes: list[Any]) -> dict[int, Failure]:
    return {rank: (out.exc, out.stack) for rank, out in enumerate(outcomes) if isinstance(out, _LocalFailure)}


def _raise_if_failed(step: str, value: Any) -> Any:
    if isinstance(value, _Failed):
        raise CheckpointException.from_failures(step, value.failures)
    return value


def _coordinate(
    coll: Collective,
    step: str,
    local_fn: Callable[[], Any],
    global_fn: Callable[[list[Any]], Any],
) -> Any:
    """Run ``local_fn`` everywhere, ``global_fn`` on the coordinator over all
    outcomes; returns ``global_fn``'s value (or a :class:`_Failed`) on the
    coordinator and None elsewhere."""
    outcomes = coll.gather(_capture(local_fn))
    if not coll.is_coordinator:
        return None
    assert outcomes is not None
    failures = _failures_of(outcomes)
    if failures:
        return _Failed(failures)
    result = _capture(lambda: global_fn(outcomes))
    if isinstance(result, _LocalFailure):
        return _Failed({coll.rank: (result.exc, result.stack)})
    return result


def reduce_scatter(
    coll: Collective,
    step: str,
    local_fn: Callable[[], Any],
    global_fn: Callable[[list[Any]], list[Any]],
) -> Any:
    """Gather local outcomes, let the coordinator turn them into one value per
    rank, and hand each rank its own."""
    result = _coordinate(coll, step, local_fn, global_fn)
    if coll.is_coordinator and isinstance(result, _Failed):
        result = [result] * coll.world_size
    return _raise_if_failed(step, coll.scatter(result))


def all_reduce(
    coll: Collective,
    step: str,
    local_fn: Callable[[], Any],
    global_fn: Callable[[list[Any]], Any],
) -> Any:
    """Gather local outcomes, let the coordinator reduce them, broadcast the result."""
    result = _coordinate(coll, step, local_fn, global_fn)
    return _raise_if_failed(step, coll.broadcast(result))


def broadcast_from_coordinator(coll: Collective, step: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the coordinator only and give every rank its value."""
    result = None
    if coll.is_coordinator:
        result = _capture(fn)
        if isinstance(result, _LocalFailure):
            result = _Failed({coll.rank: (result.exc, result.stack)})
    return _raise_if_failed(step, coll.broadcast(result))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off for the duration.

    A checkpoint of many small tensors allocates tens of thousands of plan
    objects; with the collector on, its repeated passes over them cost more
    than the save itself. Nothing the protocol allocates forms cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@gc_paused()
def save_state_dict(
    state_dict: Mapping[str, Any],
    storage_writer: StorageWriter,
    *,
    planner: SavePlanner | None = None,
    collective: Collective | None = None,
    checkpoint_id: str | None = None,
    user_metadata: dict[str, Any] | None = None,
) -> Metadata:
    """Save ``state_dict`` through ``storage_writer`` as one collective step.

    Returns the committed :class:`Metadata` on every rank.
    """
    coll = collective or SingleProcess()
    planner = planner or DefaultSavePlanner()
    storage_writer.reset(checkpoint_id)
    global_metadata: list[Metadata] = []

    def local_plan() -> SavePlan:
        storage_writer.set_up_storage_writer(coll.is_coordinator, rank=coll.rank, world_size=coll.world_size)
        planner.set_up_planner(state_dict, None, coll.is_coordinator)
        return storage_writer.prepare_local_plan(planner.create_local_plan())

    def global_plan(all_plans: list[SavePlan]) -> list[SavePlan]:
        plans, metadata = planner.create_global_plan(all_plans)
        if user_metadata:
            metadata.user_metadata = dict(user_metadata)
        global_metadata.append(metadata)
        return storage_writer.prepare_global_plan(plans)

    central_plan: SavePlan = reduce_scatter(coll, "planning", local_plan, global_plan)

    def write() -> list[WriteResult]:
        final_plan = planner.finish_plan(central_plan)
        return list(wait_future(storage_writer.write_data(final_plan, planner)))

    def commit(all_results: list[list[WriteResult]]) -> Metadata:
        metadata = global_metadata[0]
        storage_writer.finish(metadata, all_results)
        return metadata

    return all_reduce(coll, "write", write, commit)


@gc_paused()
def load_state_dict(
    state_dict: Mapping[str, Any],
    storage_reader: StorageReader,
    *,
    planner: LoadPlanner | None = None,
    collective: Collective | None = None,
    checkpoint_id: str | None = None,
    metadata: Metadata | None = None,
) -> None:
    """Load into ``state_dict`` in place through ``storage_reader``, collectively.

    The coordinator reads the manifest once and broadcasts it, unless the
    caller already holds it (``metadata``, on every rank).
    """
    coll = collective or SingleProcess()
    planner = planner or DefaultLoadPlanner()
    storage_reader.reset(checkpoint_id)
    if metadata is None:
        metadata = broadcast_from_coordinator(coll, "reading metadata", storage_reader.read_metadata)

    def local_plan() -> LoadPlan:
        storage_reader.set_up_storage_reader(metadata, coll.is_coordinator)
        planner.set_up_planner(state_dict, metadata, coll.is_coordinator)
        return storage_reader.prepare_local_plan(planner.create_local_plan())

    def global_plan(all_plans: list[LoadPlan]) -> list[LoadPlan]:
        return storage_reader.prepare_global_plan(planner.create_global_plan(all_plans))

    central_plan: LoadPlan = reduce_scatter(coll, "planning", local_plan, global_plan)

    def read() -> None:
        final_plan = planner.finish_plan(central_plan)
        wait_future(storage_reader.read_data(final_plan, planner))

    all_reduce(coll, "read", read, lambda _: None)
