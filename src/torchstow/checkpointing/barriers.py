"""Barriers that make every rank's checkpoint writer wait for the others.

The :class:`CheckpointWriter` s of all ranks write one checkpoint together:
their barrier orders the messages they exchange through the checkpoint's
store, four rounds per write, the last one after the commit and before the
post-commit hook (:mod:`torchstow.checkpointing.barrier_collective`). :class:`DistBarrier` uses a
torch.distributed process group; :class:`TCPStoreBarrier` needs only a
TCPStore, so it also works in writer processes that have no process group.
:class:`BarrierConfig` names a registered barrier type and its arguments.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torchstow.checkpointing.rank_info import RankInfo

__all__ = [
    "BARRIER_REGISTRY",
    "Barrier",
    "BarrierConfig",
    "DistBarrier",
    "TCPStoreBarrier",
    "create_barrier_from_config",
    "register_barrier",
]


class Barrier(abc.ABC):
    """Blocks until every rank has reached it."""

    barrier_type: ClassVar[str]

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Wait for every rank (raising TimeoutError if they do not all come in time)."""

    def start_write(self) -> None:  # noqa: B027 (optional: most barriers need nothing)
        """Called by the checkpoint writer before the rounds of each write, on every rank.
        A barrier that numbers its rounds numbers them afresh from here, so that ranks that
        ran different numbers of rounds in a failed write (one timed out, another came late)
        meet again in the next one. By default, nothing."""


BARRIER_REGISTRY: dict[str, type[Barrier]] = {}


def register_barrier(cls: type[Barrier]) -> type[Barrier]:
    """Class decorator: make ``cls`` available to :class:`BarrierConfig` as ``cls.barrier_type``."""
    name = getattr(cls, "barrier_type", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a barrier_type string to be registered")
    BARRIER_REGISTRY[name] = cls
    return cls


@register_barrier
class DistBarrier(Barrier):
    """A barrier over a torch.distributed process group (default: the world).

    With ``timeout_secs`` on a gloo group it is a monitored barrier, whose
    timeout names the ranks that did not arrive; otherwise ``dist.barrier``.
    """

    barrier_type = "dist_barrier"

    def __init__(self, process_group: Any = None, timeout_secs: float | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistBarrier needs an initialized torch.distributed process group; in a writer "
                "process that has none, use TCPStoreBarrier"
            )
        self._dist = dist
        self.process_group = process_group
        self.timeout_secs = timeout_secs

    def execute_barrier(self) -> None:
        dist = self._dist
        if self.timeout_secs is not None and dist.get_backend(self.process_group) == "gloo":
            try:
                dist.monitored_barrier(self.process_group, timeout=timedelta(seconds=self.timeout_secs))
            except RuntimeError as exc:
                raise TimeoutError(f"checkpoint barrier failed: {exc}") from exc
        else:
            dist.barrier(self.process_group)


@register_barrier
class TCPStoreBarrier(Barrier):
    """A barrier on a TCPStore: rank 0 hosts it at ``master_address:tcpstore_port``.

    Pass ``store`` to use an existing store instead (any torch.distributed
    Store). Each call is numbered, so a barrier object is reused for every
    write; ``timeout_secs`` bounds each wait, ``timeout_barrier_init_secs``
    the connection to the store.
    """

    barrier_type = "tcp_store"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        *,
        barrier_prefix: str = "torchstow-checkpoint",
        timeout_secs: float = 600.0,
        master_address: str = "127.0.0.1",
        tcpstore_port: int | None = None,
        timeout_barrier_init_secs: float = 30.0,
        use_checkpoint_barrier_tcpstore_libuv: bool = True,
        store: Any = None,
    ) -> None:
        import torch.distributed as dist

        if not 0 <= global_rank < global_world_size:
            raise ValueError(f"rank {global_rank} is not in a world of {global_world_size}")
        if store is None:
            if tcpstore_port is None:
                raise ValueError("TCPStoreBarrier needs tcpstore_port (and master_address), or a store")
            store = dist.TCPStore(
                master_address,
                int(tcpstore_port),
                world_size=global_world_size,
                is_master=global_rank == 0,
                timeout=timedelta(seconds=timeout_barrier_init_secs),
                wait_for_workers=False,
                use_libuv=use_checkpoint_barrier_tcpstore_libuv,
            )
        self.store = store
        self.rank = global_rank
        self.world_size = global_world_size
        self.prefix = barrier_prefix
        self.timeout_secs = timeout_secs
        self._count = 0
        self._writes = 0  # writes started (see start_write); 0: rounds numbered as before any
        self._behind: list[tuple[str, str]] = []  # (rank 0) earlier rounds' keys, not deleted yet

    def start_write(self) -> None:
        """The rounds of the n-th write through this barrier are numbered ``w<n>/0``,
        ``w<n>/1``, ...: a rank out of step after a failed write is in step again."""
        self._writes += 1
        self._count = 0

    def execute_barrier(self) -> None:
        number = f"w{self._writes}/{self._count}" if self._writes else str(self._count)
        self._count += 1
        key = f"{self.prefix}/{number}"
        # A round's counter may hold a finished round of an earlier barrier object on this
        # store and prefix (writers made afresh, a restarted job on a store that outlived it):
        # arrival n belongs to the filling (n - 1) // world_size of the counter, each opened
        # by its own key, so a stale round never lets a rank through alone.
        arrived = self.store.add(f"{key}/arrived", 1)
        filling = (arrived - 1) // self.world_size
        opened = f"{key}/open{filling}"
        if self.rank == 0:
            self._behind.append((key, opened))
        if arrived % self.world_size == 0:
            self.store.set(opened, b"1")
        try:
            self.store.wait([opened], timedelta(seconds=self.timeout_secs))
        except RuntimeError as exc:  # torch's DistStoreError is a RuntimeError
            arrived = self.store.add(f"{key}/arrived", 0) - filling * self.world_size
            raise TimeoutError(
                f"checkpoint barrier {self.prefix!r} #{number} timed out after {self.timeout_secs:g}s on "
                f"rank {self.rank}: {arrived} of {self.world_size} ranks arrived"
            ) from exc
        if self.rank == 0:
            # Everyone has left the earlier rounds, since everyone reached this one.
            for earlier, earlier_opened in self._behind[:-1]:
                self.store.delete_key(f"{earlier}/arrived")
                self.store.delete_key(earlier_opened)
            self._behind = self._behind[-1:]


@dataclass
class BarrierConfig:
    """A barrier by registered type name and constructor arguments; ``None``: no barrier."""

    barrier_type: str | None = None
    barrier_args: dict[str, Any] = field(default_factory=dict)


def create_barrier_from_config(
    config: BarrierConfig, rank_info: RankInfo | None = None, *, timeout_secs: float | None = None
) -> Barrier | None:
    """Build the barrier ``config`` names (None for no barrier).

    The rank and world size from ``rank_info``, and ``timeout_secs``, are
    passed to barrier classes that take them, unless ``barrier_args`` sets them.
    """
    if config.barrier_type is None:
        return None
    cls = BARRIER_REGISTRY.get(config.barrier_type)
    if cls is None:
        known = ", ".join(sorted(BARRIER_REGISTRY))
        raise ValueError(f"unknown barrier type {config.barrier_type!r}; registered types: {known}")
    args = dict(config.barrier_args)
    accepted = inspect.signature(cls).parameters
    defaults: dict[str, Any] = {"timeout_secs": timeout_secs}
    if rank_info is not None:
        defaults.update(global_rank=rank_info.global_rank, global_world_size=rank_info.global_world_size)
    for name, value in defaults.items():
        if name in accepted and name not in args and value is not None:
            args[name] = value
    return cls(**args)
