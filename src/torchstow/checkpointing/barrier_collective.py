"""Collectives between checkpoint writers that share no process group.

The checkpointer's writers (in a writer process, or on ranks whose process
group must not be used) still write *one* checkpoint together, through the
ordinary save protocol. What the protocol sends between ranks (plans, write
results, outcomes) travels here as small hidden files in the checkpoint's own
store, and the checkpointer's :class:`~torchstow.checkpointing.barriers.Barrier`
orders them: a sender publishes its message, every rank passes the barrier,
the receiver reads the message and deletes it.

Message names carry the write's number, the operation's number within the
write, the sender and the receiver, so a message left behind by an earlier
write of the same writer that failed is never read as part of this one (and,
published again under the same name, it is replaced before the barrier lets
anyone read). Writers made afresh number their writes from 1 again: at a
location where an earlier one's write failed with a message unread, a sender
that fails to publish the same message lets the receiver read the old one (two
independent failures; see docs/staging.md).
A message that is missing after the barrier (its sender failed to publish
it, or is out of step) becomes a failure of that rank, which the protocol
turns into the same ``CheckpointException`` on every rank, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import pickle

from torchstow.checkpointing.barriers import Barrier
from torchstow.core.protocol.collective import Collective
from torchstow.core.protocol.failures import CapturedFailure
from torchstow.core.storage.store import ByteStore

__all__ = ["EXCHANGE_PREFIX", "BarrierCollective"]

logger = logging.getLogger(__name__)

EXCHANGE_PREFIX = ".torchstow-exchange-"


class BarrierCollective(Collective):
    """Gather, scatter and broadcast through files of ``store``, one barrier each.

    ``write_id`` names this write (the same on every rank); every rank must
    run the same operations in the same order. :meth:`drain` runs the
    barriers a rank still owes when it left the protocol early, so every
    rank executes the same number of barriers per write, whatever failed.
    """

    def __init__(
        self,
        store: ByteStore,
        barrier: Barrier,
        rank: int,
        world_size: int,
        write_id: str,
        coordinator_rank: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.store = store
        self.barrier = barrier
        self.rank = rank
        self.world_size = world_size
        self.coordinator_rank = coordinator_rank
        self.write_id = write_id
        self.barriers_run = 0
        self.broken = False

    def _name(self, op: int, sender: int, receiver: int) -> str:
        return f"{EXCHANGE_PREFIX}{self.write_id}-{op}-{sender}-{receiver}"

    def _post(self, op: int, receiver: int, data: bytes) -> None:
        """Publish a message; a failure to do so shows up as a missing message on the receiver."""
        try:
            self.store.publish(self._name(op, self.rank, receiver), data)
        except Exception:
            logger.warning("rank %d could not publish a checkpoint message", self.rank, exc_info=True)

    def _take(self, op: int, sender: int, step: str) -> bytes:
        """Read (and delete) the message ``sender`` left for this rank in operation ``op``."""
        name = self._name(op, sender, self.rank)
        try:
            data = self.store.read_file(name)
        except Exception as exc:
            missing = RuntimeError(
                f"checkpoint {step}: rank {self.rank} found no message from rank {sender} in "
                f"{self.store.location} after the barrier ({type(exc).__name__}: {exc}); rank "
                f"{sender} failed to publish it, or the ranks' writers are out of step"
            )
            return pickle.dumps(CapturedFailure(missing), protocol=pickle.HIGHEST_PROTOCOL)
        with contextlib.suppress(Exception):
            self.store.delete_files([name])
        return data

    def _barrier(self) -> int:
        """Pass the barrier; the number of the operation it completed."""
        op = self.barriers_run
        self.barriers_run += 1
        try:
            self.barrier.execute_barrier()
        except BaseException:
            self.broken = True  # out of step with the other ranks: draining would only wait more
            raise
        return op

    def gather(self, obj: bytes, step: str = "") -> list[bytes] | None:
        if not self.is_coordinator:
            self._post(self.barriers_run, self.coordinator_rank, obj)
        op = self._barrier()
        if not self.is_coordinator:
            return None
        return [obj if r == self.rank else self._take(op, r, step) for r in range(self.world_size)]

    def scatter(self, objs: list[bytes] | None, step: str = "") -> bytes:
        if self.is_coordinator:
            assert objs is not None
            for receiver, data in enumerate(objs):
                if receiver != self.rank:
                    self._post(self.barriers_run, receiver, data)
        return self._receive(objs[self.rank] if objs is not None else None, step)

    def broadcast(self, obj: bytes | None, step: str = "") -> bytes:
        if self.is_coordinator:
            assert obj is not None
            for receiver in range(self.world_size):
                if receiver != self.rank:
                    self._post(self.barriers_run, receiver, obj)
        return self._receive(obj, step)

    def _receive(self, own: bytes | None, step: str) -> bytes:
        op = self._barrier()
        if self.is_coordinator:
            assert own is not None
            return own
        return self._take(op, self.coordinator_rank, step)

    def drain(self, total: int) -> None:
        """Run the barriers still owed to reach ``total`` for this write (none after a barrier failed)."""
        while not self.broken and self.barriers_run < total:
            self._barrier()
