"""The few collectives the checkpoint protocol needs, over a process group or none.

The protocol only gathers to, scatters from and broadcasts from the
coordinator, always whole Python objects (plans, results, failures), a
constant number of times per save or load, never per item.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Collective", "ProcessGroupCollective", "SingleProcess", "make_collective"]


class Collective(abc.ABC):
    """Object collectives among the ranks taking part in one save or load."""

    rank: int
    world_size: int
    coordinator_rank: int

    @property
    def is_coordinator(self) -> bool:
        """Whether this rank builds the global plan and commits."""
        return self.rank == self.coordinator_rank

    @abc.abstractmethod
    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on the coordinator, None elsewhere."""

    @abc.abstractmethod
    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank ``i`` receives ``objs[i]`` from the coordinator (``objs`` only there)."""

    @abc.abstractmethod
    def broadcast(self, obj: Any) -> Any:
        """Every rank receives the coordinator's ``obj``."""


class SingleProcess(Collective):
    """The trivial group of one rank."""

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.coordinator_rank = 0

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        assert objs is not None
        return objs[0]

    def broadcast(self, obj: Any) -> Any:
        return obj


class ProcessGroupCollective(Collective):
    """Collectives over a torch.distributed process group (a subgroup works too).

    ``coordinator_rank`` is a rank within ``process_group``.
    """

    def __init__(self, process_group: Any = None, coordinator_rank: int = 0) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if not 0 <= coordinator_rank < self.world_size:
            raise ValueError(
                f"coordinator_rank {coordinator_rank} is not a rank of the group (size {self.world_size})"
            )
        self.coordinator_rank = coordinator_rank
        self._coordinator_global = (
            coordinator_rank
            if process_group is None
            else dist.get_global_rank(process_group, coordinator_rank)
        )

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        self._dist.gather_object(obj, out, dst=self._coordinator_global, group=self.group)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        out: list[Any] = [None]
        self._dist.scatter_object_list(
            out, objs if self.is_coordinator else None, src=self._coordinator_global, group=self.group
        )
        return out[0]

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.is_coordinator else None]
        self._dist.broadcast_object_list(box, src=self._coordinator_global, group=self.group)
        return box[0]


def make_collective(
    process_group: Any = None, coordinator_rank: int = 0, no_dist: bool | None = None
) -> Collective:
    """The collective for a save or load call.

    Single process when ``no_dist`` is true or torch.distributed is not
    initialized; otherwise the given group (default: the world).
    """
    if no_dist:
        if coordinator_rank != 0:
            raise ValueError("coordinator_rank must be 0 in a single-process save or load")
        return SingleProcess()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("a process_group was given but torch.distributed is not initialized")
        if coordinator_rank != 0:
            raise ValueError("coordinator_rank must be 0 in a single-process save or load")
        return SingleProcess()
    return ProcessGroupCollective(process_group, coordinator_rank)
