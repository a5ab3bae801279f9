"""In-memory redundancy between ranks: each rank holds a copy of its partner's state.

Ranks pair up as ``r`` and ``(r + world_size // 2) % world_size`` (so a world
of 4 pairs 0-2 and 1-3, and the two copies of a state sit on different
halves of the job). :meth:`ReplicationStager.stage` stages this rank's state
dict to the CPU, sends it to the partner over a private gloo group while
receiving the partner's, and persists what it received as a torchstow
checkpoint, so a restarted rank can recover its partner's state from disk.

The exchange: a length, a pickled header (the structure with tensors
replaced by references, and the size of every distinct storage), one buffer
with all small storages packed together, then each large storage on its
own. Tensor bytes are never pickled, and shared storages travel once.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch

from torchstow.checkpointing.opener import StorageOpener
from torchstow.core.dtensors import local_view
from torchstow.core.planning import DefaultSavePlanner
from torchstow.core.protocol.collective import SingleProcess
from torchstow.core.protocol.gloo_groups import private_gloo_group
from torchstow.core.protocol.steps import save_state_dict
from torchstow.core.staging.stager import StateDictStager
from torchstow.core.staging.tensor_pickle import dumps_tensor_views, loads_tensor_views

__all__ = ["ReplicationStager"]

_SMALL = 1 << 20  # storages below this travel packed together


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


def _seconds(timeout: timedelta | float) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


class ReplicationStager:
    """Exchanges staged state dicts with a partner rank and persists the copy received.

    Every rank of ``process_group`` (default: the world) constructs it, as
    it makes a private gloo group with the same ranks (for the world, every
    rank must); the group needs an even number of ranks. ``timeout`` (seconds or a timedelta) bounds each
    exchange. The received copy is saved under ``storage_dir`` (default: a
    new directory in the system temp dir), at :meth:`persisted_uri`, as
    a torchstow checkpoint holding each DTensor's local shard; values that
    need full pickle to be stored require ``allow_pickle=True``.
    """

    def __init__(
        self,
        process_group: Any = None,
        timeout: timedelta | float = timedelta(minutes=30),
        storage_dir: str | os.PathLike[str] | None = None,
        *,
        allow_pickle: bool = False,
        opener: StorageOpener | None = None,
    ) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ReplicationStager needs torch.distributed to be initialized")
        self.timeout = _seconds(timeout)
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        group = process_group if process_group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        world_size = len(ranks)
        if world_size % 2:
            raise ValueError(
                f"ReplicationStager pairs rank r with (r + world_size // 2) % world_size, which needs an "
                f"even number of ranks; this group has {world_size}, so some rank would have no partner"
            )
        group_rank = dist.get_rank(group)
        partner = (group_rank + world_size // 2) % world_size
        self.rank = ranks[group_rank]
        self.partner_rank = ranks[partner]
        self._group = private_gloo_group(
            ranks, timedelta(seconds=self.timeout), step="replication", what="the ReplicationStager's group"
        )
        self._partner_in_group = dist.get_group_rank(self._group, self.partner_rank)
        self._stager = StateDictStager()
        self.allow_pickle = allow_pickle
        self.opener = opener if opener is not None else StorageOpener()
        if storage_dir is None:
            self._storage_dir = tempfile.mkdtemp(prefix="torchstow-replicas-")
        else:
            self._storage_dir = os.fspath(storage_dir)
            os.makedirs(self._storage_dir, exist_ok=True)
        self._broken: str | None = None
        self._closed = False

    @property
    def storage_dir(self) -> str:
        """Where received copies are persisted."""
        return self._storage_dir

    def persisted_uri(self, rank: int, partner_rank: int) -> str:
        """The checkpoint in which ``rank`` keeps the copy it received from ``partner_rank``."""
        return os.path.join(self._storage_dir, f"rank-{rank}-replica-of-{partner_rank}")

    def stage(self, state_dict: Any) -> Any:
        """Send this rank's state dict to the partner; return (and persist) the partner's.

        The returned copy lives in CPU memory: plain tensors, DTensors with
        the partner's shard and spec, the same containers and non-tensor
        leaves. Raises TimeoutError if the partner does not take part within
        the timeout; after a failed exchange the stager cannot be used again.
        """
        if self._closed:
            raise RuntimeError("this ReplicationStager is closed")
        if self._broken is not None:
            raise RuntimeError(f"this ReplicationStager failed earlier ({self._broken}); make a new one")
        staged = self._stager.stage(state_dict)
        try:
            received = self._exchange(staged)
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        self._persist(received)
        return received

    def _exchange(self, staged: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        header, storages = self._describe(staged)
        sizes = [s.nbytes() for s in storages]
        small = [i for i, n in enumerate(sizes) if n < _SMALL]
        outgoing = [
            torch.tensor([len(header)], dtype=torch.int64),
            torch.frombuffer(bytearray(header), dtype=torch.uint8),
        ]
        if sum(sizes[i] for i in small):
            outgoing.append(torch.cat([_bytes_of(storages[i]) for i in small]))
        outgoing += [_bytes_of(storages[i]) for i in range(len(storages)) if sizes[i] >= _SMALL]
        sends = [self._group.send([t], self._partner_in_group, tag) for tag, t in enumerate(outgoing)]

        length = torch.zeros(1, dtype=torch.int64)
        self._wait(self._group.recv([length], self._partner_in_group, 0), deadline, "the header's length")
        header_in = torch.empty(int(length.item()), dtype=torch.uint8)
        self._wait(self._group.recv([header_in], self._partner_in_group, 1), deadline, "the header")
        body, sizes_in = pickle.loads(header_in.numpy().tobytes())
        small_in = [i for i, n in enumerate(sizes_in) if n < _SMALL]
        buffers: dict[int, torch.Tensor] = {}
        receives = []
        tag = 2
        packed = torch.empty(sum(sizes_in[i] for i in small_in), dtype=torch.uint8)
        if len(packed):
            receives.append(self._group.recv([packed], self._partner_in_group, tag))
            tag += 1
        for i, n in enumerate(sizes_in):
            if n >= _SMALL:
                buffers[i] = torch.empty(n, dtype=torch.uint8)
                receives.append(self._group.recv([buffers[i]], self._partner_in_group, tag))
                tag += 1
        for work in receives:
            self._wait(work, deadline, "the tensors")
        for work in sends:
            self._wait(work, deadline, "the sending of this rank's state dict")
        offset = 0
        for i in small_in:
            buffers[i] = packed[offset : offset + sizes_in[i]].clone()
            offset += sizes_in[i]
        return self._rebuild(body, [buffers[i].untyped_storage() for i in range(len(sizes_in))])

    def _wait(self, work: Any, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            work.wait(timedelta(seconds=remaining))
        except (RuntimeError, TimeoutError) as exc:
            partner = f"partner rank {self.partner_rank}"
            if time.monotonic() >= deadline or "timed out" in str(exc).lower():
                raise TimeoutError(
                    f"rank {self.rank}: {partner} did not exchange its state dict within {self.timeout:g}s "
                    f"(waiting for {what}); is rank {self.partner_rank} alive and calling "
                    "ReplicationStager.stage?"
                ) from exc
            raise RuntimeError(
                f"rank {self.rank}: the state dict exchange with {partner} failed while waiting for "
                f"{what}: {exc}"
            ) from exc

    @staticmethod
    def _describe(staged: Any) -> tuple[bytes, list[torch.UntypedStorage]]:
        """The header for ``staged`` and its distinct storages, in order."""
        storages: list[torch.UntypedStorage] = []
        index: dict[int, int] = {}

        def storage_key(local: torch.Tensor) -> int:
            storage = local.untyped_storage()
            if id(storage) not in index:
                index[id(storage)] = len(storages)
                storages.append(storage)
            return index[id(storage)]

        body = dumps_tensor_views(staged, storage_key, keep_dtensors=True)
        return pickle.dumps((body, [s.nbytes() for s in storages])), storages

    @staticmethod
    def _rebuild(body: bytes, storages: list[torch.UntypedStorage]) -> Any:
        return loads_tensor_views(body, storages.__getitem__)

    def _persist(self, received: Any) -> None:
        save_state_dict(
            local_view(received),
            self.opener.writer(self.persisted_uri(self.rank, self.partner_rank), overwrite=True),
            planner=DefaultSavePlanner(allow_pickle=self.allow_pickle),
            collective=SingleProcess(),
            user_metadata={"replica_of_rank": self.partner_rank, "kept_by_rank": self.rank},
        )

    def close(self) -> None:
        """Free the staging buffers; persisted copies stay on disk. (The private
        group lives as long as torch.distributed, see ``private_gloo_group``.)"""
        self._stager.close()
        self._closed = True
