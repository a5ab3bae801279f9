"""The few collectives the checkpoint protocol needs, over a process group or none.

The protocol only gathers to, scatters from and broadcasts from the
coordinator, always whole Python objects (plans, results, failures), a
constant number of times per save or load, never per item; a read-once load
also moves byte buffers from the rank that read them to those that need them
(broadcasts, or sends to a few ranks), started in one agreed order.

Over a process group, a collective that cannot complete (a rank died,
stalled, or is slower than the timeout) raises
:class:`~torchstow.errors.CheckpointTimeoutError` on the ranks that
wait, instead of leaving them waiting forever.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import datetime
import weakref
from collections.abc import Callable
from typing import Any

from torchstow.core.protocol.held_tensors import aliases
from torchstow.errors import CheckpointTimeoutError

__all__ = [
    "Collective",
    "ProcessGroupCollective",
    "SingleProcess",
    "Timeout",
    "lost_contact",
    "make_collective",
]

Timeout = float | datetime.timedelta


class Collective(abc.ABC):
    """Collectives among the ranks taking part in one save or load.

    Where ``crosses_processes`` is true the payloads are ``bytes`` (the
    protocol pickles values itself); otherwise they are objects handed over
    as they are. ``step`` names the protocol step for error messages.
    """

    rank: int
    world_size: int
    coordinator_rank: int
    #: Whether objects cross process boundaries (and so are pickled on the way).
    crosses_processes: bool = True
    #: Whether the ranks confirm, in one more small collective, that a value the
    #: coordinator sent them unpickled on every rank (see :mod:`.steps`). Without it a
    #: rank that cannot unpickle one leaves the protocol, and the others learn of it only
    #: at the next gather (the checkpointer's exchange, whose rounds are fixed).
    confirms_receipt: bool = False

    @property
    def is_coordinator(self) -> bool:
        """Whether this rank builds the global plan and commits."""
        return self.rank == self.coordinator_rank

    @abc.abstractmethod
    def gather(self, obj: Any, step: str = "") -> list[Any] | None:
        """Every rank's ``obj`` in rank order on the coordinator, None elsewhere."""

    @abc.abstractmethod
    def scatter(self, objs: list[Any] | None, step: str = "") -> Any:
        """Rank ``i`` receives ``objs[i]`` from the coordinator (``objs`` only there)."""

    @abc.abstractmethod
    def broadcast(self, obj: Any, step: str = "") -> Any:
        """Every rank receives the coordinator's ``obj``."""

    def step_timeout(self) -> datetime.timedelta | None:
        """How long a rank waits for the others in one collective (None: no limit)."""
        return None

    #: Whether :meth:`transfer` moves buffers between ranks (read-once loads use it).
    can_exchange: bool = False

    def transfer(self, buffer: Any, source: int, peers: tuple[int, ...], step: str = "") -> Any:
        """Start sending ``buffer`` (a uint8 CPU tensor) from rank ``source`` into the buffers
        of the same size that ``peers`` pass; returns what :meth:`wait` takes.

        Every rank of ``(source, *peers)`` calls it, and all ranks start their transfers in
        the same order; a transfer to every other rank is one broadcast. The buffer must
        stay untouched until the wait."""
        raise NotImplementedError(f"{type(self).__name__} cannot exchange buffers")

    def wait(self, pending: Any, step: str = "") -> None:
        """Wait until a transfer started by :meth:`transfer` is done (received into its buffer)."""
        raise NotImplementedError(f"{type(self).__name__} cannot exchange buffers")

    def plan_cache_key(self) -> Any:
        """What identifies this group of ranks for reusing save plans (see
        :mod:`torchstow.core.protocol.plan_cache`), or None (the default): saves
        over this collective always plan in full and run no extra exchange."""
        return None

    def all_gather_records(self, record: bytes, step: str = "") -> list[bytes]:
        """Every rank's ``record`` (bytes of the same length on every rank), on every rank.

        For small fixed-size records such as digests. The default composes a
        gather and a broadcast; a process group does it in one collective.
        """
        gathered = self.gather(record, step)
        joined = self.broadcast(b"".join(gathered) if gathered is not None else None, step)
        size = len(record)
        return (
            [joined[i : i + size] for i in range(0, len(joined), size)] if size else [b""] * self.world_size
        )


class SingleProcess(Collective):
    """The trivial group of one rank: objects are handed over as they are."""

    crosses_processes = False

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.coordinator_rank = 0

    def gather(self, obj: Any, step: str = "") -> list[Any]:
        return [obj]

    def scatter(self, objs: list[Any] | None, step: str = "") -> Any:
        assert objs is not None
        return objs[0]

    def broadcast(self, obj: Any, step: str = "") -> Any:
        return obj


def _as_timedelta(timeout: Timeout | None) -> datetime.timedelta | None:
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        value = timeout
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        value = datetime.timedelta(seconds=timeout)
    else:
        raise TypeError(f"timeout must be seconds (a number) or a timedelta, got {timeout!r}")
    if value <= datetime.timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return value


#: Process groups a collective here lost contact on: broken for good (gloo closes them).
_broken: weakref.WeakSet[Any] = weakref.WeakSet()


def lost_contact(group: Any) -> bool:
    """Whether a collective here lost contact on ``group`` (it is broken for good)."""
    try:
        return group in _broken
    except TypeError:  # a group object that takes no weak reference is never noted
        return False


class ProcessGroupCollective(Collective):
    """Byte collectives over a torch.distributed process group (a subgroup works too).

    The payloads are ``bytes`` (the protocol pickles values itself); they
    travel as uint8 tensors on the device the group uses for objects (the
    CPU when it has a CPU backend), a size exchange then the bytes, so
    torch's object collectives (and their need for NumPy) are not involved.

    ``coordinator_rank`` is a rank within ``process_group``. With a
    ``timeout``, the group's CPU (gloo) backend uses it for the duration of
    each collective here, and its own timeout again afterwards; without
    one, the group's own timeout applies.
    """

    confirms_receipt = True

    def __init__(
        self, process_group: Any = None, coordinator_rank: int = 0, timeout: Timeout | None = None
    ) -> None:
        import torch
        import torch.distributed as dist

        self._dist = dist
        self._torch = torch
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the process_group passed to save/load")
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
        self.timeout = _as_timedelta(timeout)
        self._backend = self._cpu_backend() if self.timeout is not None else None
        self._device = self._object_device()

    def _object_device(self) -> Any:
        """Where the group moves objects: the CPU if it has a CPU backend, else its accelerator."""
        from torch.distributed import distributed_c10d

        try:
            kind = distributed_c10d._get_object_coll_device(self.group)
        except (AttributeError, TypeError, ValueError, RuntimeError):
            kind = "cpu"
        if kind == "cpu":
            return self._torch.device("cpu")
        module = getattr(self._torch, kind)
        return self._torch.device(kind, module.current_device())

    @property
    def _resolved_group(self) -> Any:
        """The group the collectives run on: the one given, else the default (world) group."""
        return self.group if self.group is not None else self._dist.group.WORLD

    def _cpu_backend(self) -> Any:
        """The group's backend for CPU tensors (where the collectives run)."""
        try:
            backend = self._resolved_group._get_backend(self._torch.device("cpu"))
            backend.options._timeout  # noqa: B018 (must be readable to be restored)
        except (RuntimeError, AttributeError) as exc:
            raise ValueError(
                "timeout= needs a process group with a CPU (gloo) backend; initialize torch.distributed "
                "with backend='cpu:gloo,cuda:nccl', or pass process_group=dist.new_group(backend='gloo')"
            ) from exc
        return backend

    def group_timeout(self) -> datetime.timedelta | None:
        """The group's own timeout (its CPU backend's; torch tells it only through a private
        API), or None where it cannot be read (a group without a CPU backend)."""
        try:
            value = self._cpu_backend().options._timeout
        except ValueError:
            return None
        return value if isinstance(value, datetime.timedelta) else None

    def step_timeout(self) -> datetime.timedelta | None:
        return self.timeout or self.group_timeout()

    def _call(self, op: str, step: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run (or start) one torch.distributed operation under the timeout, turning a lost
        peer (a closed connection, or the wait timing out) into CheckpointTimeoutError."""
        args, kwargs = aliases(args, kwargs)  # waited for at exit until gloo's threads let go
        backend = self._backend
        previous = None
        if backend is not None:
            previous = backend.options._timeout
            backend.set_timeout(self.timeout)
        try:
            return fn(*args, group=self.group, **kwargs)
        except RuntimeError as exc:
            raise self._lost(op, step, exc) from exc
        finally:
            if backend is not None:
                backend.set_timeout(previous)

    def _lost(self, op: str, step: str, exc: BaseException) -> CheckpointTimeoutError:
        """The error of an operation that failed in the transport; the group is noted as
        broken, so that a later failure on it says why it fails at once."""
        limit = (
            f"the timeout of {self.timeout.total_seconds():g}s"
            if self.timeout is not None
            else "the process group's timeout (pass timeout= to save/load to shorten it)"
        )
        group = self._resolved_group
        if lost_contact(group):
            advice = (
                "This group already lost contact in an earlier save or load of this process: gloo "
                "closes a group's connections for good once one of its collectives fails or times "
                "out, so every collective on it fails from then on. Restart the job before saving "
                "again (a synchronous save may instead pass a new process group; async_save makes "
                "a new commit group at its first call after the save that broke it is over)"
            )
        else:
            advice = "Check the other ranks' logs; if they were only slow, pass a larger timeout="
        with contextlib.suppress(TypeError):  # a group object that takes no weak reference
            _broken.add(group)
        return CheckpointTimeoutError(
            f"checkpoint {step or op}: rank {self.rank} lost contact with its group of "
            f"{self.world_size} ranks (coordinator {self.coordinator_rank}) in the {op}: another "
            f"rank died, stalled, or did not reach this step within {limit}. {advice}. "
            f"Transport error: {exc}",
            rank=self.rank,
            step=step,
        )

    def _sizes(self, values: list[int]) -> Any:
        return self._torch.tensor(values, dtype=self._torch.int64, device=self._device)

    def _buffer(self, data: bytes | None, size: int) -> Any:
        """``data`` zero-padded to ``size`` bytes, as a uint8 tensor on the group's device."""
        tensor = self._torch.zeros(size, dtype=self._torch.uint8)
        if data:
            ctypes.memmove(tensor.data_ptr(), data, len(data))
        return tensor.to(self._device)

    def _bytes(self, tensor: Any, size: int) -> bytes:
        host = tensor[:size].cpu()  # held while its memory is copied
        return ctypes.string_at(host.data_ptr(), size) if size else b""

    def gather(self, obj: bytes, step: str = "") -> list[bytes] | None:
        op = "gather to the coordinator"
        sizes = [self._sizes([0]) for _ in range(self.world_size)]
        self._call(op, step, self._dist.all_gather, sizes, self._sizes([len(obj)]))
        lengths = [int(size.item()) for size in sizes]
        longest = max(lengths)
        out = [self._buffer(None, longest) for _ in lengths] if self.is_coordinator else None
        buffer = self._buffer(obj, longest)
        self._call(op, step, self._dist.gather, buffer, gather_list=out, dst=self._coordinator_global)
        if out is None:
            return None
        return [self._bytes(tensor, length) for tensor, length in zip(out, lengths, strict=True)]

    def scatter(self, objs: list[bytes] | None, step: str = "") -> bytes:
        op = "scatter from the coordinator"
        heads = None
        if objs is not None:
            longest = max(len(data) for data in objs)
            heads = [self._sizes([len(data), longest]) for data in objs]
        head = self._sizes([0, 0])
        self._call(op, step, self._dist.scatter, head, scatter_list=heads, src=self._coordinator_global)
        length, longest = (int(v) for v in head.tolist())
        parts = None if objs is None else [self._buffer(data, longest) for data in objs]
        buffer = self._buffer(None, longest)
        self._call(op, step, self._dist.scatter, buffer, scatter_list=parts, src=self._coordinator_global)
        return self._bytes(buffer, length)

    can_exchange = True

    def transfer(self, buffer: Any, source: int, peers: tuple[int, ...], step: str = "") -> Any:
        op = "transfer of loaded bytes"
        moved = buffer.to(self._device)  # the buffer itself where the group works on the CPU
        src = self._global(source)
        if len(peers) + 1 == self.world_size:
            works = [self._call(op, step, self._dist.broadcast, moved, src=src, async_op=True)]
        elif self.rank == source:
            works = [self._call(op, step, self._dist.isend, moved, dst=self._global(peer)) for peer in peers]
        else:
            works = [self._call(op, step, self._dist.irecv, moved, src=src)]
        return works, moved, buffer if self.rank != source else None

    def wait(self, pending: Any, step: str = "") -> None:
        works, moved, received = pending
        try:
            for work in works:
                if self.timeout is not None:
                    work.wait(self.timeout)
                else:
                    work.wait()
        except RuntimeError as exc:
            raise self._lost("transfer of loaded bytes", step, exc) from exc
        if received is not None and moved is not received:
            received.copy_(moved)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else int(self._dist.get_global_rank(self.group, rank))

    def plan_cache_key(self) -> Any:
        return (id(self._resolved_group), self.rank, self.world_size, self.coordinator_rank)

    def all_gather_records(self, record: bytes, step: str = "") -> list[bytes]:
        op = "exchange of fixed-size records"
        size = len(record)
        out = [self._buffer(None, size) for _ in range(self.world_size)]
        self._call(op, step, self._dist.all_gather, out, self._buffer(record, size))
        return [self._bytes(tensor, size) for tensor in out]

    def broadcast(self, obj: bytes | None, step: str = "") -> bytes:
        op = "broadcast from the coordinator"
        head = self._sizes([len(obj) if self.is_coordinator and obj is not None else 0])
        self._call(op, step, self._dist.broadcast, head, src=self._coordinator_global)
        length = int(head.item())
        buffer = self._buffer(obj if self.is_coordinator else None, length)
        self._call(op, step, self._dist.broadcast, buffer, src=self._coordinator_global)
        if self.is_coordinator and obj is not None:
            return obj
        return self._bytes(buffer, length)


def make_collective(
    process_group: Any = None,
    coordinator_rank: int = 0,
    no_dist: bool | None = None,
    timeout: Timeout | None = None,
) -> Collective:
    """The collective for a save or load call.

    Single process when ``no_dist`` is true or torch.distributed is not
    initialized (``timeout`` then has nothing to wait for); otherwise the
    given group (default: the world).
    """
    _as_timedelta(timeout)
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
    return ProcessGroupCollective(process_group, coordinator_rank, timeout)
