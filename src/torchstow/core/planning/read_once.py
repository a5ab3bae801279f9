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

A shared region of at least twice :data:`SPLIT_BYTES` stored bytes (one huge
replicated tensor) is not left to one reader: it is cut into parts of at least
that size along its row-major layout, each starting on a checksum block boundary
so that its reader verifies it alone, and the parts are shared like regions of
their own. Every rank needing the region receives the parts it did not read into
its target and commits the region once, after the last part landed. A chunk
stored compressed is read whole, never in parts.

The reader of each shared region or chunk is chosen by
:func:`~torchstow.core.planning.balance.assign_owners` (the node with the fewest bytes
to read so far, then the rank), after charging every rank what only it reads. Each
region travels from its reader's memory straight into the receivers' (a broadcast
when every other rank needs it), small regions for the same ranks packed together;
the transfers are ordered by how much their reader must read before it has them,
so that readers send one part while they read the next.

Non-tensor values (small, pickled or torch-serialized leaves) are read by each rank
that needs them.
"""

from __future__ import annotations

import itertools
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
    "DIRECT_BYTES",
    "PACK_BYTES",
    "SPLIT_BYTES",
    "ReadOnceProbe",
    "ReadOnceRole",
    "Share",
    "Transfer",
    "piece_item",
    "plan_read_once",
    "scratch_fqn",
    "segment_bytes",
]

#: A region of at least this many bytes travels alone, from the reader's target straight
#: into the receivers'; smaller regions for the same ranks are packed into one transfer.
DIRECT_BYTES = 1 << 20

#: The most bytes packed into one transfer.
PACK_BYTES = 8 << 20

#: A shared region of at least twice this many stored bytes is read in parts of at least
#: this many, by different ranks.
SPLIT_BYTES = 32 << 20

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


def piece_item(item: ReadItem, part: tuple[torch.Size, torch.Size]) -> ReadItem:
    """The read of part ``(offsets, lengths)`` of ``item``'s region (offsets relative to it)."""
    offsets, lengths = part
    return ReadItem(
        item.type,
        item.dest_index,
        torch.Size(a + b for a, b in zip(item.dest_offsets, offsets, strict=True)),
        item.storage_index,
        torch.Size(a + b for a, b in zip(item.storage_offsets, offsets, strict=True)),
        lengths,
    )


@dataclass(frozen=True)
class ReadOnceProbe:
    """What a rank tells the coordinator besides its load plan.

    ``node`` names its machine (ranks sharing one share its storage bandwidth);
    ``casts`` maps each key it loads into another dtype than stored to that dtype.
    """

    node: str
    casts: Mapping[str, torch.dtype] = field(default_factory=dict)


@dataclass(frozen=True)
class Transfer:
    """One movement of bytes: ``source`` sends ``nbytes`` to ``peers`` (a broadcast when they
    are all the other ranks). The regions it carries lie one after another in it, each
    starting at a multiple of 16 bytes."""

    source: int
    peers: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Share:
    """One region a rank sends or receives: its size, the transfer it travels in (an index
    into the rank's :attr:`ReadOnceRole.transfers`), and the peers (destinations, or the
    one source).

    On the receiving side ``item`` is the index of the item it fills in the rank's plan.
    On the sending side it is the index of the plan item whose committed bytes go out,
    or, with ``chunk`` set, the region ``(offsets, lengths)`` of whole-chunk read number
    ``chunk[0]`` of the rank's role (``item`` is then -1).

    With ``part`` set, the share is that part ``(offsets, lengths)`` of the item's region
    (offsets relative to it): a sender reads it (:func:`piece_item`) and sends it; every
    rank commits the item once all its parts are in place.
    """

    item: int
    nbytes: int
    transfer: int
    peers: tuple[int, ...]
    chunk: tuple[int, torch.Size, torch.Size] | None = None
    part: tuple[torch.Size, torch.Size] | None = None


@dataclass(frozen=True)
class ReadOnceRole:
    """One rank's part in a read-once load.

    ``reads`` are the indices of the plan items the rank reads from storage whole (None: all
    of them); ``chunks`` the whole stored chunks it reads into scratch buffers (with their
    dtype), and ``local`` the items of its own it fills from them (item, chunk number);
    ``transfers`` are those the rank takes part in, in the order every rank starts them
    (a reader's in the order it reads: what it sends first, it reads first); ``sends``
    and ``receives`` list the shared regions in that order.
    """

    reads: list[int] | None
    sends: list[Share]
    receives: list[Share]
    transfers: list[Transfer]
    chunks: list[tuple[ReadItem, torch.dtype]] = field(default_factory=list)
    local: list[tuple[int, int]] = field(default_factory=list)

    @staticmethod
    def alone() -> ReadOnceRole:
        """The role of a rank that reads everything it needs itself, in a load without exchanges."""
        return ReadOnceRole(None, [], [], [])


_Region = tuple[torch.Size, torch.Size]  # (offsets in the stored chunk, lengths)
_ChunkKey = tuple[str, torch.Size, torch.dtype]


def _raw_blocks(info: Any) -> bool:
    """Whether a chunk stored at ``info`` is raw bytes with block checksums, so any span of
    it can be read and verified alone (not another format's encoded item, not compressed)."""
    return isinstance(info, StorageInfo) and info.codec is None


def _span_bytes(sizes: torch.Size, region: _Region, itemsize: int, info: Any) -> int:
    """Bytes a rank reads from storage for ``region`` of a stored chunk on its own: where the
    chunk is not raw bytes with block checksums (another format's encoded item, or a
    compressed one: read whole and then narrowed), all of it."""
    offsets, lengths = region
    if not _raw_blocks(info):
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


def _parts(sizes: torch.Size, region: _Region, itemsize: int, info: Any, split: int) -> list[_Region] | None:
    """The parts ``(offsets in the region, lengths)`` different ranks read of a shared
    ``region`` of at least ``2 * split`` stored bytes: ranges along its first dimension longer
    than one, each at least about ``split`` bytes and starting on a checksum block boundary;
    None where it is read whole (smaller, strided, compressed, or not raw bytes with block
    checksums)."""
    offsets, lengths = region
    count = math.prod(lengths) * itemsize // max(split, 1)
    if count < 2 or not _raw_blocks(info):
        return None
    span = chunk_math.contiguous_span(sizes, offsets, lengths)
    if span is None:
        return None
    dim = next(d for d, n in enumerate(lengths) if n > 1)  # the dimensions before it have length 1
    row = math.prod(lengths[dim + 1 :]) * itemsize  # bytes of one step along it
    block = block_bytes(info.block_size, info.length)
    start = span[0] * itemsize
    common = math.gcd(row, block)
    if start % common:
        return None
    # the steps r where a block starts, (start + r * row) % block == 0: first + k * every
    every = block // common
    first = (-start // common) * pow(row // common, -1, every) % every
    total = lengths[dim]
    cuts = set()
    for k in range(1, count):
        at = first + round((total * k / count - first) / every) * every
        if 0 < at < total:
            cuts.add(at)
    if not cuts:
        return None
    bounds = [0, *sorted(cuts), total]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        part_offsets = [0] * len(lengths)
        part_offsets[dim] = lo
        part_lengths = list(lengths)
        part_lengths[dim] = hi - lo
        parts.append((torch.Size(part_offsets), torch.Size(part_lengths)))
    return parts


def plan_read_once(
    plans: Sequence[LoadPlan],
    metadata: Metadata,
    probes: Sequence[ReadOnceProbe],
    split_bytes: int | None = None,
) -> list[ReadOnceRole]:
    """Every rank's :class:`ReadOnceRole` for ``plans`` (one per rank, rank order); shared
    regions of at least twice ``split_bytes`` (default :data:`SPLIT_BYTES`) read in parts."""
    split = SPLIT_BYTES if split_bytes is None else split_bytes
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
    # what each shared thing is: (bytes, holders, chunk key, region or None for the whole
    # chunk, part of the region or None for all of it)
    shared: list[tuple[int, list[int], _ChunkKey, _Region | None, _Region | None]] = []
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
            shared.append((math.prod(sizes[key]) * dtype.itemsize, holders, key, None, None))
            continue
        for region, found in regions.items():
            nbytes = math.prod(region[1]) * dtype.itemsize
            if len(found) > 1 and nbytes > 0:
                ranks = [rank for rank, _ in found]
                parts = _parts(sizes[key], region, itemsize, info, split)
                for part in parts if parts is not None else [None]:
                    size = nbytes if part is None else math.prod(part[1]) * dtype.itemsize
                    shared.append((size, ranks, key, region, part))
    if not shared:
        return [ReadOnceRole.alone() for _ in plans]
    skip: list[set[int]] = [set() for _ in range(world)]  # items each rank does not read itself
    for _, _, key, shared_region, _ in shared:
        regions = chunks[key]
        for found in [regions[shared_region]] if shared_region is not None else regions.values():
            for rank, i in found:
                skip[rank].add(i)
    load = own  # charged what each rank reads for itself alone (below: minus what it shares)
    for key, regions in chunks.items():
        for region, found in regions.items():
            nbytes = math.prod(region[1]) * key[2].itemsize
            for rank, i in found:
                if i in skip[rank]:
                    load[rank] -= nbytes
    readers = assign_owners(
        load,
        [0] * world,
        [(nbytes, holders) for nbytes, holders, *_ in shared],
        _node_numbers(probes),
    )
    roles = [_Role() for _ in range(world)]
    outgoing: list[list[_Send]] = [[] for _ in range(world)]  # each reader's sends, in its read order
    for number, ((nbytes, _, key, shared_region, part), reader) in enumerate(
        zip(shared, readers, strict=True)
    ):
        regions = chunks[key]
        if shared_region is not None:
            found = regions[shared_region]
            mine = next(i for rank, i in found if rank == reader)
            dests = tuple((rank, i) for rank, i in found if rank != reader)
            file, start = _location(infos.get(MetadataIndex(key[0], key[1])))
            if part is None:
                skip[reader].discard(mine)  # the reader reads it into its own target
                at = (file, start, 0)
                outgoing[reader].append(_Send(("item", mine), nbytes, nbytes, mine, None, dests, at))
            else:  # the parts of one region lie in shared in the order they are stored
                at = (file, start, number)
                outgoing[reader].append(_Send(("part", number), nbytes, nbytes, mine, None, dests, at, part))
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
        whole = math.prod(sizes[key]) * dtype.itemsize
        at = (*_location(infos.get(MetadataIndex(fqn, offset))), 0)
        for (offsets, lengths), found in regions.items():
            size = math.prod(lengths) * dtype.itemsize
            for rank, i in found:
                if rank == reader:
                    roles[reader].local.append((i, scratch))
                    continue
                where = (scratch, offsets, lengths)
                outgoing[reader].append(_Send(("chunk", scratch), whole, size, -1, where, ((rank, i),), at))
    for sends in outgoing:  # in the order the reader reads them: by file, then offset
        sends.sort(key=lambda send: send.at)
    for packed in sorted(_pack(outgoing), key=lambda p: (p.ready, p.source, p.number)):
        _place(roles, packed)
    return [
        ReadOnceRole(
            [i for i in range(len(plan.items)) if i not in skip[rank]] if skip[rank] else None,
            role.sends,
            role.receives,
            role.transfers,
            role.chunks,
            role.local,
        )
        for rank, (plan, role) in enumerate(zip(plans, roles, strict=True))
    ]


@dataclass
class _Send:
    """One region a reader sends: what it reads for it (plan item, or whole-chunk read) and
    how many bytes that is, the region's bytes, the :class:`Share` fields, its receivers."""

    read: tuple[str, int]  # what is read for it: ("item", i), ("chunk", n) or ("part", n)
    read_bytes: int
    nbytes: int
    item: int
    chunk: tuple[int, torch.Size, torch.Size] | None
    dests: tuple[tuple[int, int], ...]  # (rank, item index there)
    at: tuple[str, int, int]  # where it is stored: file, offset, then the order of parts
    part: _Region | None = None


def _location(info: Any) -> tuple[str, int]:
    """(file, offset) of a stored chunk, the order a reader reads in."""
    return (str(getattr(info, "relative_path", "")), int(getattr(info, "offset", 0)))


@dataclass
class _Packed:
    """The sends of one transfer, and when the reader has them: after reading ``ready`` bytes."""

    ready: int
    source: int
    number: int
    peers: tuple[int, ...]
    sends: list[_Send]
    nbytes: int
    small: bool


def _pack(outgoing: Sequence[Sequence[_Send]]) -> list[_Packed]:
    """Each reader's sends cut into transfers: a large region alone, runs of small ones to
    the same ranks packed together."""
    out: list[_Packed] = []
    for source, sends in enumerate(outgoing):
        seen: set[tuple[str, int]] = set()
        ready = 0
        last: _Packed | None = None
        for send in sends:
            if send.read not in seen:
                seen.add(send.read)
                ready += send.read_bytes
            peers = tuple(rank for rank, _ in send.dests)
            small = send.nbytes < DIRECT_BYTES
            if (
                small
                and last is not None
                and last.peers == peers
                and last.small
                and segment_bytes(last.nbytes) + send.nbytes <= PACK_BYTES
            ):
                last.sends.append(send)
                last.ready = ready
                last.nbytes = segment_bytes(last.nbytes) + send.nbytes
                continue
            last = _Packed(ready, source, len(out), peers, [send], send.nbytes, small)
            out.append(last)
    return out


def _place(roles: Sequence[_Role], packed: _Packed) -> None:
    """Add the next transfer to the roles of the ranks taking part."""
    numbers = {}
    for rank in (packed.source, *packed.peers):
        numbers[rank] = len(roles[rank].transfers)
        roles[rank].transfers.append(Transfer(packed.source, packed.peers, packed.nbytes))
    for send in packed.sends:
        source = roles[packed.source]
        number = numbers[packed.source]
        source.sends.append(Share(send.item, send.nbytes, number, packed.peers, send.chunk, send.part))
        for rank, i in send.dests:
            received = Share(i, send.nbytes, numbers[rank], (packed.source,), None, send.part)
            roles[rank].receives.append(received)


class _Role:
    """A role being built."""

    def __init__(self) -> None:
        self.sends: list[Share] = []
        self.receives: list[Share] = []
        self.transfers: list[Transfer] = []
        self.chunks: list[tuple[ReadItem, torch.dtype]] = []
        self.local: list[tuple[int, int]] = []


def _node_numbers(probes: Sequence[ReadOnceProbe]) -> list[int]:
    numbers: dict[str, int] = {}
    return [numbers.setdefault(probe.node, len(numbers)) for probe in probes]
