"""Read-once load planning: which rank reads which stored bytes, and who it sends them to.

When several ranks of a load need the same stored region (a replicated value, the
replicas of a DTensor's shard, the same region of a reshard), one of them reads it
from storage and the others receive it over the process group. The coordinator
decides over every rank's load plan: regions are the same when their stored chunk,
their offsets and lengths in it, and the dtype they are loaded as agree. The reader
of each shared region is chosen by :func:`~torchstow.core.planning.balance.assign_owners`
(the node with the fewest bytes to read so far, then the rank), after charging every
rank the regions only it needs. Sends are cut into rounds of bounded size, each one
exchange of buffers among all ranks.

Non-tensor values (small, pickled or torch-serialized leaves) are read by each rank
that needs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from torchstow.core.planning.balance import assign_owners
from torchstow.core.planning.items import LoadItemType, LoadPlan
from torchstow.format.manifest import Metadata, TensorStorageMetadata

__all__ = ["ROUND_BYTES", "ReadOnceProbe", "ReadOnceRole", "Share", "plan_read_once", "segment_bytes"]

#: The most bytes one rank sends, or receives, in one round of the fan-out.
ROUND_BYTES = 256 << 20

#: Regions travel aligned to this many bytes, so a received region is viewed in any dtype.
_ALIGN = 16


def segment_bytes(nbytes: int) -> int:
    """The room a region of ``nbytes`` takes in an exchange buffer."""
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class ReadOnceProbe:
    """What a rank tells the coordinator besides its load plan.

    ``node`` names its machine (ranks sharing one share its storage bandwidth);
    ``casts`` maps each key it loads into another dtype than stored to that dtype.
    """

    node: str
    casts: Mapping[str, torch.dtype] = field(default_factory=dict)


@dataclass(frozen=True)
class Share:
    """One region a rank sends or receives: its item in the rank's plan, its size,
    the round it travels in, and the peers (destinations, or the one source)."""

    item: int
    nbytes: int
    round: int
    peers: tuple[int, ...]


@dataclass(frozen=True)
class ReadOnceRole:
    """One rank's part in a read-once load.

    ``reads`` are the indices of the plan items the rank reads from storage (None: all of
    them); ``sends`` and ``receives`` list the shared regions in the coordinator's region
    order, which fixes where each lies in the exchange buffers; every rank runs ``rounds``
    exchanges.
    """

    reads: list[int] | None
    sends: list[Share]
    receives: list[Share]
    rounds: int

    @staticmethod
    def alone() -> ReadOnceRole:
        """The role of a rank that reads everything it needs itself, in a load without exchanges."""
        return ReadOnceRole(None, [], [], 0)


_Key = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], torch.dtype]


def plan_read_once(
    plans: Sequence[LoadPlan],
    metadata: Metadata,
    probes: Sequence[ReadOnceProbe],
    round_bytes: int = ROUND_BYTES,
) -> list[ReadOnceRole]:
    """Every rank's :class:`ReadOnceRole` for ``plans`` (one per rank, rank order)."""
    world = len(plans)
    stored = metadata.state_dict_metadata
    holders: dict[_Key, list[tuple[int, int]]] = {}  # region -> (rank, item index), first per rank
    sizes: dict[_Key, int] = {}
    for rank, plan in enumerate(plans):
        casts = probes[rank].casts
        for i, item in enumerate(plan.items):
            if item.type != LoadItemType.TENSOR:
                continue
            index = item.storage_index
            entry = stored.get(index.fqn)
            if not isinstance(entry, TensorStorageMetadata) or index.offset is None:
                continue
            dtype = casts.get(item.dest_index.fqn, entry.properties.dtype)
            key = (index.fqn, tuple(index.offset), tuple(item.storage_offsets), tuple(item.lengths), dtype)
            found = holders.get(key)
            if found is None:
                holders[key] = [(rank, i)]
                sizes[key] = math.prod(item.lengths) * dtype.itemsize
            elif found[-1][0] != rank:
                found.append((rank, i))
    shared = [key for key, found in holders.items() if len(found) > 1 and sizes[key] > 0]
    if not shared:
        return [ReadOnceRole.alone() for _ in plans]
    skip: list[set[int]] = [set() for _ in range(world)]  # items each rank receives
    load = [0] * world
    for key, found in holders.items():
        if len(found) == 1:
            load[found[0][0]] += sizes[key]
    node_ids: dict[str, int] = {}
    nodes = [node_ids.setdefault(probe.node, len(node_ids)) for probe in probes]
    readers = assign_owners(
        load, [0] * world, [(sizes[key], [rank for rank, _ in holders[key]]) for key in shared], nodes
    )
    sends: list[list[Share]] = [[] for _ in range(world)]
    receives: list[list[Share]] = [[] for _ in range(world)]
    round_no = 0
    out = [0] * world
    into = [0] * world
    for key, reader in zip(shared, readers, strict=True):
        found = holders[key]
        room = segment_bytes(sizes[key])
        dests = [(rank, i) for rank, i in found if rank != reader]
        over = out[reader] + room * len(dests) > round_bytes or any(
            into[rank] + room > round_bytes for rank, _ in dests
        )
        if over and (out[reader] > 0 or any(into[rank] > 0 for rank, _ in dests)):
            round_no += 1
            out = [0] * world
            into = [0] * world
        out[reader] += room * len(dests)
        reader_item = next(i for rank, i in found if rank == reader)
        sends[reader].append(Share(reader_item, sizes[key], round_no, tuple(rank for rank, _ in dests)))
        for rank, i in dests:
            into[rank] += room
            receives[rank].append(Share(i, sizes[key], round_no, (reader,)))
            skip[rank].add(i)
    roles = []
    for rank, plan in enumerate(plans):
        reads = [i for i in range(len(plan.items)) if i not in skip[rank]] if skip[rank] else None
        roles.append(ReadOnceRole(reads, sends[rank], receives[rank], round_no + 1))
    return roles
