"""Read-once load planning: which rank reads which stored bytes, and who it sends them to.

When several ranks of a load need bytes of the same stored chunk, one of them reads
them from storage and the others receive them over the process group. The
coordinator decides over every rank's load plan, chunk by chunk (a chunk loaded
into different dtypes counts as different chunks):

- when every rank needing the chunk needs the same region of it (a replicated
  value, the replicas of a DTensor's shard), one of them reads the region into its
  own target and sends it to the others;
- when ranks need different regions whose reads would overlap (reads are widened to
  whole checksum blocks, and a strided region is read from its first row to its
  last), one rank reads the whole chunk into a scratch buffer and sends each rank
  its region;
- otherwise regions needed by several ranks are shared as above and the rest are
  read by the rank that needs them.

The reader of each shared region or chunk is chosen by
:func:`~torchstow.core.planning.balance.assign_owners` (the node with the fewest bytes
to read so far, then the rank), after charging every rank what only it reads. Sends
are cut into rounds of bounded size, each one exchange of buffers among all ranks.

Non-tensor values (small, pickled or torch-serialized leaves) are read by each rank
that needs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchstow.core.planning.balance import assign_owners
from torchstow.core.planning.items import LoadItemType, LoadPlan, ReadItem
from torchstow.format import chunks as chunk_math
from torchstow.format.checksums import block_bytes
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata

__all__ = [
    "ROUND_BYTES",
    "ReadOnceProbe",
    "ReadOnceRole",
    "Share",
    "plan_read_once",
    "scratch_fqn",
    "segment_bytes",
]

#: The most bytes one rank sends, or receives, in one round of the fan-out.
ROUND_BYTES = 256 << 20

#: A chunk is read whole by one rank when reading its regions apart would read this
#: much more than the chunk.
_OVERLAP = 1.02

#: Regions travel aligned to this many bytes, so a received region is viewed in any dtype.
_ALIGN = 16


def segment_bytes(nbytes: int) -> int:
    """The room a region of ``nbytes`` takes in an exchange buffer."""
    return -(-nbytes // _ALIGN) * _ALIGN


def scratch_fqn(fqn: str) -> str:
    """The destination key of a whole-chunk read of ``fqn`` (no state dict key has it)."""
    return f"{fqn}\0read-once"


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
    """One region a rank sends or receives: its size, the round it travels in, and the
    peers (destinations, or the one source).

    On the receiving side ``item`` is the index of the item it fills in the rank's plan.
    On the sending side it is the index of the plan item whose committed bytes go out,
    or, with ``chunk`` set, the region ``(offsets, lengths)`` of whole-chunk read number
    ``chunk[0]`` of the rank's role (``item`` is then -1).
    """

    item: int
    nbytes: int
    round: int
    peers: tuple[int, ...]
    chunk: tuple[int, torch.Size, torch.Size] | None = None


@dataclass(frozen=True)
class ReadOnceRole:
    """One rank's part in a read-once load.

    ``reads`` are the indices of the plan items the rank reads from storage (None: all of
    them); ``chunks`` the whole stored chunks it reads into scratch buffers (with their
    dtype), and ``local`` the items of its own it fills from them (item, chunk number);
    ``sends`` and ``receives`` list the shared regions in the coordinator's order, which
    fixes where each lies in the exchange buffers; every rank runs ``rounds`` exchanges.
    """

    reads: list[int] | None
    sends: list[Share]
    receives: list[Share]
    rounds: int
    chunks: list[tuple[ReadItem, torch.dtype]] = field(default_factory=list)
    local: list[tuple[int, int]] = field(default_factory=list)

    @staticmethod
    def alone() -> ReadOnceRole:
        """The role of a rank that reads everything it needs itself, in a load without exchanges."""
        return ReadOnceRole(None, [], [], 0)


_Region = tuple[torch.Size, torch.Size]  # (offsets in the stored chunk, lengths)
_ChunkKey = tuple[str, torch.Size, torch.dtype]


def _span_bytes(sizes: torch.Size, region: _Region, itemsize: int, info: Any) -> int:
    """Bytes a rank reads from storage for ``region`` of a stored chunk on its own: where the
    chunk is not raw bytes with block checksums (another format's encoded item, read whole
    and then narrowed, as DCP does), all of it."""
    offsets, lengths = region
    if not isinstance(info, StorageInfo):
        return math.prod(sizes) * itemsize
    span = chunk_math.contiguous_span(sizes, offsets, lengths)
    if span is None:  # strided: read from its first row to its last
        stride = 1
        first = last = 0
        for d in range(len(sizes) - 1, -1, -1):
            first += offsets[d] * stride
            last += (offsets[d] + lengths[d] - 1) * stride
            stride *= sizes[d]
        span = (first, last + 1 - first)
    block = block_bytes(info.block_size, info.length)
    start = span[0] * itemsize // block * block
    end = min(info.length, -(-(span[0] + span[1]) * itemsize // block) * block)
    return max(0, end - start)


class _Rounds:
    """Cuts the shares into rounds of at most ``limit`` bytes sent and received per rank."""

    def __init__(self, world: int, limit: int) -> None:
        self.limit = limit
        self.number = 0
        self.out = [0] * world
        self.into = [0] * world

    def place(self, reader: int, dests: Sequence[tuple[int, int]]) -> int:
        """The round of a send from ``reader`` to ``dests`` (rank, bytes), counted in."""
        world = len(self.out)
        sent = sum(segment_bytes(nbytes) for _, nbytes in dests)
        over = self.out[reader] + sent > self.limit or any(
            self.into[rank] + segment_bytes(nbytes) > self.limit for rank, nbytes in dests
        )
        if over and (self.out[reader] > 0 or any(self.into[rank] > 0 for rank, _ in dests)):
            self.number += 1
            self.out = [0] * world
            self.into = [0] * world
        self.out[reader] += sent
        for rank, nbytes in dests:
            self.into[rank] += segment_bytes(nbytes)
        return self.number


def plan_read_once(
    plans: Sequence[LoadPlan],
    metadata: Metadata,
    probes: Sequence[ReadOnceProbe],
    round_bytes: int = ROUND_BYTES,
) -> list[ReadOnceRole]:
    """Every rank's :class:`ReadOnceRole` for ``plans`` (one per rank, rank order)."""
    world = len(plans)
    stored = metadata.state_dict_metadata
    infos = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else {}
    # stored chunk -> region -> (rank, item index), the first such item of each rank
    chunks: dict[_ChunkKey, dict[_Region, list[tuple[int, int]]]] = {}
    sizes: dict[_ChunkKey, torch.Size] = {}
    own = [0] * world  # tensor bytes each rank needs
    for rank, plan in enumerate(plans):
        casts = probes[rank].casts
        for i, item in enumerate(plan.items):
            if item.type != LoadItemType.TENSOR:
                continue
            index = item.storage_index
            entry = stored.get(index.fqn)
            if not isinstance(entry, TensorStorageMetadata) or index.offset is None:
                continue
            key = (index.fqn, index.offset, casts.get(item.dest_index.fqn, entry.properties.dtype))
            regions = chunks.get(key)
            if regions is None:
                regions = chunks[key] = {}
                sizes[key] = chunk_math.stored_chunk_sizes(entry, index)
            own[rank] += math.prod(item.lengths) * key[2].itemsize
            found = regions.setdefault((item.storage_offsets, item.lengths), [])
            if not found or found[-1][0] != rank:
                found.append((rank, i))
    # what each shared thing is: (bytes, holders, chunk key, region or None for the whole chunk)
    shared: list[tuple[int, list[int], _ChunkKey, _Region | None]] = []
    for key, regions in chunks.items():
        fqn, offset, dtype = key
        holders = sorted({rank for found in regions.values() for rank, _ in found})
        if len(holders) < 2:
            continue
        info = infos.get(MetadataIndex(fqn, offset))
        itemsize = stored[fqn].properties.dtype.itemsize  # type: ignore[union-attr]
        whole = math.prod(sizes[key]) * itemsize
        apart = sum(_span_bytes(sizes[key], region, itemsize, info) for region in regions)
        if len(regions) > 1 and apart > _OVERLAP * whole:
            shared.append((math.prod(sizes[key]) * dtype.itemsize, holders, key, None))
            continue
        for part, found in regions.items():
            nbytes = math.prod(part[1]) * dtype.itemsize
            if len(found) > 1 and nbytes > 0:
                shared.append((nbytes, [rank for rank, _ in found], key, part))
    if not shared:
        return [ReadOnceRole.alone() for _ in plans]
    skip: list[set[int]] = [set() for _ in range(world)]  # items each rank does not read itself
    for _, _, key, region in shared:
        regions = chunks[key]
        for found in [regions[region]] if region is not None else regions.values():
            for rank, i in found:
                skip[rank].add(i)
    load = own  # charged what each rank reads for itself alone (below: minus what it shares)
    for key, regions in chunks.items():
        for part, found in regions.items():
            nbytes = math.prod(part[1]) * key[2].itemsize
            for rank, i in found:
                if i in skip[rank]:
                    load[rank] -= nbytes
    readers = assign_owners(
        load,
        [0] * world,
        [(nbytes, holders) for nbytes, holders, _, _ in shared],
        _node_numbers(probes),
    )
    roles = [_Role() for _ in range(world)]
    rounds = _Rounds(world, round_bytes)
    for (_, _, key, region), reader in zip(shared, readers, strict=True):
        regions = chunks[key]
        if region is not None:
            found = regions[region]
            nbytes = math.prod(region[1]) * key[2].itemsize
            dests = [(rank, i) for rank, i in found if rank != reader]
            number = rounds.place(reader, [(rank, nbytes) for rank, _ in dests])
            mine = next(i for rank, i in found if rank == reader)
            skip[reader].discard(mine)  # the reader reads it into its own target
            roles[reader].sends.append(Share(mine, nbytes, number, tuple(rank for rank, _ in dests)))
            for rank, i in dests:
                roles[rank].receives.append(Share(i, nbytes, number, (reader,)))
            continue
        fqn, offset, dtype = key
        scratch = len(roles[reader].chunks)
        zeros = torch.Size((0,) * len(offset))
        whole_read = ReadItem(
            LoadItemType.TENSOR,
            MetadataIndex(scratch_fqn(fqn), offset),
            zeros,
            MetadataIndex(fqn, offset),
            zeros,
            sizes[key],
        )
        roles[reader].chunks.append((whole_read, dtype))
        for (offsets, lengths), found in regions.items():
            nbytes = math.prod(lengths) * dtype.itemsize
            for rank, i in found:
                if rank == reader:
                    roles[reader].local.append((i, scratch))
                    continue
                number = rounds.place(reader, [(rank, nbytes)])
                where = (scratch, offsets, lengths)
                roles[reader].sends.append(Share(-1, nbytes, number, (rank,), where))
                roles[rank].receives.append(Share(i, nbytes, number, (reader,)))
    return [
        ReadOnceRole(
            [i for i in range(len(plan.items)) if i not in skip[rank]] if skip[rank] else None,
            role.sends,
            role.receives,
            rounds.number + 1,
            role.chunks,
            role.local,
        )
        for rank, (plan, role) in enumerate(zip(plans, roles, strict=True))
    ]


class _Role:
    """A role being built."""

    def __init__(self) -> None:
        self.sends: list[Share] = []
        self.receives: list[Share] = []
        self.chunks: list[tuple[ReadItem, torch.dtype]] = []
        self.local: list[tuple[int, int]] = []


def _node_numbers(probes: Sequence[ReadOnceProbe]) -> list[int]:
    numbers: dict[str, int] = {}
    return [numbers.setdefault(probe.node, len(numbers)) for probe in probes]
