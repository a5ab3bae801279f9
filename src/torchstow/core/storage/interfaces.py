"""The storage protocol: what a backend implements to save and load checkpoints.

These mirror torch.distributed.checkpoint's ``StorageWriter``/``StorageReader``
so DCP-style backends port over directly. Futures returned by ``write_data``
and ``read_data`` may be ``torch.futures.Future`` or
``concurrent.futures.Future``; :func:`torchstow.core.futures.wait_future` waits on either.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torchstow.core.futures import AnyFuture
from torchstow.core.planning import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torchstow.format.located import LocationColumns
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo

__all__ = [
    "StorageReader",
    "StorageWriter",
    "WriteResult",
    "WrittenItems",
    "bytes_written",
    "location_columns",
]


@dataclass(frozen=True)
class WriteResult:
    """What writing one item produced: its index, size, and where it went."""

    index: MetadataIndex
    size_in_bytes: int
    storage_data: Any


class WrittenItems(Sequence[WriteResult]):
    """A writer's write results kept as columns (:class:`LocationColumns`), as
    torchstow's layout writer returns them from ``write_data``: a sequence of
    :class:`WriteResult` (made when first asked for) that pickles as its columns, so
    it travels to the coordinator as a few buffers, and the coordinator's ``finish``
    builds the manifest's chunk table from the columns without an object per item."""

    __slots__ = ("_results", "columns")

    def __init__(self, columns: LocationColumns) -> None:
        self.columns = columns
        self._results: list[WriteResult] | None = None

    def _made(self) -> list[WriteResult]:
        if self._results is None:
            self._results = [WriteResult(i, n, info) for i, info, n in self.columns.items()]
        return self._results

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, i: Any) -> Any:
        return self._made()[i]

    def __iter__(self) -> Iterator[WriteResult]:
        return iter(self._made())

    def __reduce__(self) -> tuple[Any, ...]:
        return (WrittenItems, (self.columns,))


def location_columns(results: Sequence[WriteResult]) -> LocationColumns:
    """A writer's results as columns: a :class:`WrittenItems`' own, else made from
    :class:`WriteResult` objects (a writer that returns a list of them), whose
    ``storage_data`` must each be a :class:`StorageInfo`."""
    if isinstance(results, WrittenItems):
        return results.columns
    listed = list(results)
    infos = [r.storage_data for r in listed]
    for result, info in zip(listed, infos, strict=True):
        if not isinstance(info, StorageInfo):
            raise TypeError(
                f"the write result of {result.index!r} holds a {type(info).__name__}; a torchstow "
                "manifest records a StorageInfo per item"
            )
    return LocationColumns.of([r.index for r in listed], infos, [r.size_in_bytes for r in listed])


def bytes_written(results: Sequence[WriteResult]) -> int:
    """Bytes a writer's results say it wrote (from the columns of a :class:`WrittenItems`)."""
    if isinstance(results, WrittenItems):
        return results.columns.bytes_written()
    return sum(r.size_in_bytes for r in results)


class StorageWriter(abc.ABC):
    """Writes one checkpoint. Call order in a save, on every rank unless noted:

    ``reset`` -> ``set_up_storage_writer`` -> ``prepare_local_plan`` ->
    ``prepare_global_plan`` (coordinator) -> ``write_data`` -> ``finish``
    (coordinator, after every rank wrote).
    """

    @abc.abstractmethod
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Prepare for a new save, optionally to another checkpoint location."""

    @abc.abstractmethod
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Set up for this rank; ``rank`` and ``world_size`` come as keywords."""

    @abc.abstractmethod
    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Adjust this rank's plan (e.g. attach storage data)."""

    @abc.abstractmethod
    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: adjust all plans (e.g. give each rank a file prefix)."""

    @abc.abstractmethod
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> AnyFuture:
        """Write the plan's items, resolving each through ``planner.resolve_data``.

        Returns a future of the :class:`WriteResult` of each item: a list, or a
        :class:`WrittenItems` holding them as columns (torchstow's layout writer).
        """

    @abc.abstractmethod
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator: commit the checkpoint (write the manifest last).
        ``results`` holds what each rank's ``write_data`` gave, in rank order."""

    def renew_plan(self, plan: SavePlan) -> SavePlan | None:
        """This rank's final plan of the previous save, made fit for a new save of
        the same structure (e.g. fresh file names), without the coordinator.

        Called on every rank (after ``prepare_local_plan``) when the global plan
        may be reused (see :mod:`torchstow.core.protocol.plan_cache`). The default
        returns None: this writer cannot renew a plan, and every save is planned in full.
        """
        return None

    def abort(self) -> None:
        """Called on every rank whose save failed when the commit certainly did not
        and will not happen (this rank's write failed, the coordinator never began
        the commit, or its commit failed for good): remove what this rank wrote,
        best effort, but nothing a manifest committed at the location lists.

        Never called once the outcome is unknown (see :meth:`commit_outcome`). Not
        part of DCP's protocol; the default does nothing, so a writer that leaves
        debris is still correct (nothing without a manifest is a checkpoint).
        """
        return None

    def commit_outcome(self) -> bool | None:
        """After a failed save whose commit this rank cannot rule out (its results
        were handed to the coordinator, then the answer was lost; or, on the
        coordinator, ``finish`` raised): True if this save's manifest is committed
        at the location, False if it certainly is not and never will be (then
        :meth:`abort` is called), None if that cannot be told (the files are kept).

        A writer answers by reading the location. The default, None, keeps the files.
        """
        return None

    @classmethod
    @abc.abstractmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether this writer can handle ``checkpoint_id``."""


class StorageReader(abc.ABC):
    """Reads one checkpoint. Call order in a load:

    ``reset`` -> ``read_metadata`` (coordinator) -> ``set_up_storage_reader``
    -> ``prepare_local_plan`` -> ``prepare_global_plan`` (coordinator) ->
    ``read_data``.
    """

    @abc.abstractmethod
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Prepare for a new load, optionally from another checkpoint location."""

    @abc.abstractmethod
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read the checkpoint's manifest."""

    @abc.abstractmethod
    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Set up for this rank with the manifest the coordinator read."""

    @abc.abstractmethod
    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Adjust this rank's plan."""

    @abc.abstractmethod
    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: adjust all plans."""

    @abc.abstractmethod
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> AnyFuture:
        """Read the plan's items into ``planner.resolve_tensor``/``load_bytes``.

        Returns a future that completes when all items are loaded.
        """

    @classmethod
    @abc.abstractmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether this reader can handle ``checkpoint_id``."""
