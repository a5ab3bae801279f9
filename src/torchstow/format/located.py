"""Where a save's items were written, as columns: what each rank hands the coordinator,
and the chunk table the coordinator builds from them.

A rank's writer describes the items it wrote in one :class:`LocationColumns`: a few
arrays and byte strings (each item's key, position hint and chunk offsets; its file,
byte offset, length, checksum block, crc32c values, codec, digest and bytes written),
so it pickles as a few buffers, never as one object per item. The coordinator turns
every rank's columns and the manifest's entries into the manifest's chunk table at once
(:func:`located_table`): each item finds its row by its key and the position hint the
planners give it (``MetadataIndex.index``), checked a column at a time. The result is
the :class:`~torchstow.format.table.ChunkTable` a load decodes, so a manifest just saved
and one just loaded are the same columns (``Metadata.storage_data`` a
:class:`~torchstow.format.table.TableLocations` over it).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate, chain, compress, pairwise, repeat
from operator import attrgetter, is_not, itemgetter
from typing import Any

import torch

from torchstow.format.buffers import tensor_bytes
from torchstow.format.manifest import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorStorageMetadata,
    new_storage_info,
)
from torchstow.format.table import (
    DIGEST,
    ChunkTable,
    EntryShape,
    TableChunks,
    TableColumns,
    TableLocations,
    crc_counts,
    encode_table,
    one_thread,
)

__all__ = ["LocationColumns", "attach_locations", "entry_shapes", "located_table", "locations_table"]

_KEY_FIELDS = attrgetter("fqn", "offset", "index")
_INFO_FIELDS = attrgetter(
    "relative_path", "offset", "length", "block_size", "checksums", "content_hash", "codec"
)
_OFFSETS = attrgetter("offsets")
_SIZES = attrgetter("sizes")


_COLUMNS = {  # the per-key and per-item columns, and their array type codes
    "name_lengths": "i",
    "name_hashes": "q",
    "key": "i",
    "hint": "i",
    "ndim": "b",
    "offsets": "q",
    "file": "i",
    "offset": "q",
    "length": "q",
    "block": "q",
    "crcs": "I",
    "codec": "B",
    "has_digest": "B",
    "written": "q",
}


def key_hash(name: bytes) -> tuple[int, int]:
    """A key's name digest: 128 bits of BLAKE2b as two int64 (the same on every rank,
    unlike Python's ``hash``). Keys are told apart by it, as incremental saves tell
    contents apart by their BLAKE3 digests."""
    digest = hashlib.blake2b(name, digest_size=16).digest()
    low, high = digest[:8], digest[8:]
    return int.from_bytes(low, "little", signed=True), int.from_bytes(high, "little", signed=True)


class LocationColumns:
    """The locations of the items one writer wrote, as columns, in the order written.

    Keys are named once each: ``names`` (their UTF-8 bytes one after another) with
    ``name_lengths`` and ``name_hashes`` (a 128-bit BLAKE2b digest of each, two int64).
    Per item: ``key`` (into them), ``hint`` (the chunk's position in its entry, -1:
    none), ``ndim`` (-1: an object, whose key has no offsets) with the chunk's
    ``offsets`` flat; ``file`` (into ``files``), ``offset``, ``length``, ``block``, with
    the ``crcs`` flat (``ceil(length / block)`` of them, as in a chunk table), ``codec``
    (0: none, i: ``codecs[i - 1]``), ``has_digest`` with the 32-byte ``digests`` of the
    items that have one, and ``written`` (the bytes this save wrote for it: 0 for an
    item shared with an incremental save's base).
    """

    __slots__ = (*_COLUMNS, "codecs", "digests", "files", "names")
    names: bytes
    name_lengths: array[int]
    name_hashes: array[int]
    key: array[int]
    hint: array[int]
    ndim: array[int]
    offsets: array[int]
    files: list[str]
    file: array[int]
    offset: array[int]
    length: array[int]
    block: array[int]
    crcs: array[int]
    codecs: list[str]
    codec: array[int]
    has_digest: array[int]
    digests: bytes
    written: array[int]

    def __init__(self, **columns: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, columns[name])

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, tuple(getattr(self, name) for name in self.__slots__))

    def __len__(self) -> int:
        return len(self.key)

    @classmethod
    def of(
        cls, indices: Sequence[MetadataIndex], infos: Sequence[StorageInfo], written: Sequence[int]
    ) -> LocationColumns:
        """The columns of items given as objects (keys, locations and bytes written, in
        step), each field taken a column at a time."""
        keys = list(map(_KEY_FIELDS, indices))
        fqns = list(map(itemgetter(0), keys))
        distinct = list(dict.fromkeys(fqns))
        ids = {name: i for i, name in enumerate(distinct)}
        encoded = [name.encode() for name in distinct]
        offsets = list(map(itemgetter(1), keys))
        tensor = list(map(is_not, offsets, repeat(None)))
        hints = [-1 if hint is None else hint for hint in map(itemgetter(2), keys)]
        fields = list(map(_INFO_FIELDS, infos))
        paths = list(map(itemgetter(0), fields))
        files = list(dict.fromkeys(paths))
        file_ids = {name: i for i, name in enumerate(files)}
        checksums = list(map(itemgetter(4), fields))
        hashes = list(map(itemgetter(5), fields))
        codec_names = list(map(itemgetter(6), fields))
        codecs = [name for name in dict.fromkeys(codec_names) if name is not None]
        codec_ids: dict[str | None, int] = {None: 0, **{name: i + 1 for i, name in enumerate(codecs)}}
        made = cls(
            names=b"".join(encoded),
            name_lengths=array("i", map(len, encoded)),
            name_hashes=array("q", chain.from_iterable(map(key_hash, encoded))),
            key=array("i", map(ids.__getitem__, fqns)),
            hint=array("i", hints),
            ndim=array("b", [len(o) if t else -1 for o, t in zip(offsets, tensor, strict=True)]),
            offsets=array("q", chain.from_iterable(compress(offsets, tensor))),
            files=files,
            file=array("i", map(file_ids.__getitem__, paths)),
            offset=array("q", map(itemgetter(1), fields)),
            length=array("q", map(itemgetter(2), fields)),
            block=array("q", map(itemgetter(3), fields)),
            crcs=array("I", chain.from_iterable(checksums)),
            codecs=codecs,
            codec=array("B", map(codec_ids.__getitem__, codec_names)),
            has_digest=array("B", map(is_not, hashes, repeat(None))),
            digests=_digest_bytes(hashes),
            written=array("q", written),
        )
        given = _joined([array("q", map(len, checksums))], "q")
        if not torch.equal(given, crc_counts(made.column("length"), made.column("block"))):
            raise ValueError("an item's checksums are not one crc32c per block of its length")
        return made

    def column(self, name: str) -> torch.Tensor:
        """Column ``name`` as an int64 tensor (a copy)."""
        return _joined([getattr(self, name)], _COLUMNS[name]).to(torch.int64)

    def bytes_written(self) -> int:
        """Bytes the items took to write."""
        return sum(self.written)

    def file_names(self) -> set[str]:
        """The files some item is in."""
        return {self.files[i] for i in set(self.file)}

    def items(self) -> Iterator[tuple[MetadataIndex, StorageInfo, int]]:
        """Each item as objects (its key, location and bytes written), in order."""
        starts = _starts(self.name_lengths)
        names = [self.names[a:b].decode() for a, b in pairwise(starts)]
        counts = crc_counts(self.column("length"), self.column("block")).tolist()
        at_dim = at_crc = at_digest = 0
        for i in range(len(self.key)):
            nd = self.ndim[i]
            offsets = None
            if nd >= 0:
                offsets = torch.Size(self.offsets[at_dim : at_dim + nd])
                at_dim += nd
            hint = self.hint[i]
            index = MetadataIndex(names[self.key[i]], offsets, None if hint < 0 else hint)
            crcs = tuple(self.crcs[at_crc : at_crc + counts[i]])
            at_crc += counts[i]
            digest = None
            if self.has_digest[i]:
                digest = self.digests[at_digest * DIGEST : (at_digest + 1) * DIGEST].hex()
                at_digest += 1
            codec = self.codec[i]
            info = new_storage_info(
                self.files[self.file[i]],
                self.offset[i],
                self.length[i],
                crcs,
                self.block[i],
                digest,
                self.codecs[codec - 1] if codec else None,
            )
            yield index, info, self.written[i]


def _rebuild(*columns: Any) -> LocationColumns:
    return LocationColumns(**dict(zip(LocationColumns.__slots__, columns, strict=True)))


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The indices ``starts[i] .. starts[i] + counts[i] - 1`` of every ``i``, one range
    after another (as a grid when every count is the same)."""
    if not counts.numel():
        return torch.zeros(0, dtype=torch.int64)
    least, most = int(counts.min()), int(counts.max())
    if least == most:
        return (starts[:, None] + torch.arange(most, dtype=torch.int64)).reshape(-1)
    firsts = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(firsts, counts)
    return torch.repeat_interleave(starts, counts) + within


def _starts(lengths: Sequence[int]) -> list[int]:
    return list(accumulate(lengths, initial=0))


def _digest_bytes(hashes: list[str | None]) -> bytes:
    """The digests that are there, as raw bytes one after another."""
    present = [h for h in hashes if h is not None]
    if not present:
        return b""
    raw = b"".join(map(bytes.fromhex, present))
    if len(raw) != DIGEST * len(present):
        bad = next(h for h in present if len(bytes.fromhex(h)) != DIGEST)
        raise ValueError(f"a content hash of {len(bytes.fromhex(bad))} bytes is not a BLAKE3 digest: {bad!r}")
    return raw


# -- the coordinator: every rank's columns -> the chunk table ------------------------------

_DTYPES = {"q": torch.int64, "i": torch.int32, "I": torch.int32, "b": torch.int8, "B": torch.uint8}


def _joined(parts: Sequence[Any], typecode: str) -> torch.Tensor:
    """The arrays ``parts`` (of ``typecode``) one after another, as a tensor (one copy;
    uint32 values as the bits of int32)."""
    buffer = bytearray().join(parts)
    dtype = _DTYPES[typecode]
    return torch.frombuffer(buffer, dtype=dtype) if buffer else torch.zeros(0, dtype=dtype)


def _gathered(batches: Sequence[LocationColumns], name: str) -> torch.Tensor:
    """Column ``name`` of every batch, one after another."""
    return _joined([getattr(b, name) for b in batches], _COLUMNS[name])


def entry_shapes(md: Metadata) -> list[EntryShape]:
    """What a chunk table needs of ``md``'s entries (as its JSON would give them)."""
    shapes = []
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            shapes.append(EntryShape.of_object(fqn, meta.encoding))
        else:
            shapes.append(EntryShape.of_tensor(fqn, meta.size, meta.properties.dtype.itemsize))
    return shapes


_JSON, _TENSOR, _OBJECT = 0, 1, 2  # kinds of entries: inline, a tensor, an object stored in a file


class _Geometry:
    """The rows of the table before their locations: per entry its kind, chunk count (a
    tensor's) and dimensions; every tensor chunk's offsets and sizes, flat, in entry order."""

    def __init__(self, md: Metadata) -> None:
        entries = md.state_dict_metadata
        self.fqns = list(entries)
        count, ndim, kind = array("q"), array("q"), array("q")
        offsets: list[Any] = []
        sizes: list[Any] = []
        layouts: dict[tuple[int, int, int], list[tuple[list[Any], Any, Any]]] = {}
        for fqn, meta in entries.items():
            if isinstance(meta, BytesStorageMetadata):
                count.append(0)
                ndim.append(0)
                kind.append(_JSON if meta.encoding == "json" else _OBJECT)
                continue
            nd = len(meta.size)
            chunks = meta.chunks
            o, s = self._layout(chunks, layouts)
            if len(o) != len(chunks) * nd or len(s) != len(o):
                raise ValueError(f"{fqn}: a chunk's offsets or sizes do not have {nd} values")
            count.append(len(chunks))
            ndim.append(nd)
            kind.append(_TENSOR)
            offsets.append(o)
            sizes.append(s)
        for column in (count, ndim, kind):  # a last entry of none, for items of no entry
            column.append(0)
        self.count, self.ndim, self.kind = (_joined([c], "q") for c in (count, ndim, kind))
        self.offsets, self.sizes = _joined(offsets, "q"), _joined(sizes, "q")
        dims = self.count * self.ndim
        self.dim_start = torch.cumsum(dims, 0) - dims  # where each entry's first chunk's offsets are

    @staticmethod
    def _layout(
        chunks: Sequence[Any], layouts: dict[tuple[int, int, int], list[tuple[list[Any], Any, Any]]]
    ) -> tuple[Any, Any]:
        """The chunks' offsets and sizes, flat; once per layout (the planners give tensors
        chunked alike the same chunk objects, so a list comparison is mostly identity tests)."""
        if isinstance(chunks, TableChunks):
            return chunks.flat_layout()
        if not chunks:
            return array("q"), array("q")
        listed = chunks if type(chunks) is list else list(chunks)
        key = (len(listed), id(listed[0]), id(listed[-1]))
        known = layouts.setdefault(key, [])
        for other, o, s in known:
            if other == listed:
                return o, s
        o = array("q", chain.from_iterable(map(_OFFSETS, listed)))
        s = array("q", chain.from_iterable(map(_SIZES, listed)))
        known.append((listed, o, s))
        return o, s


def _entries_of_keys(batches: Sequence[LocationColumns], fqns: list[str]) -> torch.Tensor:
    """The entry each batch's key names (-1: none), every batch's keys one after another,
    found by their name digests."""
    digests = _gathered(batches, "name_hashes").reshape(-1, 2)
    known = torch.tensor([key_hash(fqn.encode()) for fqn in fqns] or [(0, 0)], dtype=torch.int64)
    known = known[: len(fqns)]
    order = torch.argsort(known[:, 0])
    ordered = known[order]
    if not len(fqns) or not digests.numel():
        return torch.full((digests.shape[0],), -1, dtype=torch.int64)
    if bool((ordered[1:, 0] == ordered[:-1, 0]).any()):  # two names share 64 bits: by name
        names = b"".join(b.names for b in batches)
        ids = {fqn.encode(): i for i, fqn in enumerate(fqns)}
        starts = _starts(_gathered(batches, "name_lengths").tolist())
        return torch.tensor([ids.get(names[a:b], -1) for a, b in pairwise(starts)], dtype=torch.int64)
    at = torch.searchsorted(ordered[:, 0].contiguous(), digests[:, 0].contiguous()).clamp(max=len(fqns) - 1)
    found = (ordered[at] == digests).all(1)
    return torch.where(found, order[at], -1)


def _global_ids(
    batches: Sequence[LocationColumns], lists: str, column: str, counts: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    """Every name the batches' ``lists`` hold (in first use), and each item's index into
    them (from its batch's own index, ``column``). Codecs count from 1 (0: none)."""
    codecs = column == "codec"
    merged = list(dict.fromkeys(chain.from_iterable(getattr(b, lists) for b in batches)))
    ids = {name: i + codecs for i, name in enumerate(merged)}
    maps = [array("q", [0] * codecs + list(map(ids.__getitem__, getattr(b, lists)))) for b in batches]
    sizes = torch.tensor([len(m) for m in maps], dtype=torch.int64)
    base = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, counts)
    return merged, _joined(maps, "q")[_gathered(batches, column).to(torch.int64) + base]


def _only_used(
    ids: torch.Tensor, used_items: torch.Tensor, names: list[str], shift: int
) -> tuple[torch.Tensor, list[str]]:
    """``ids`` (counting from ``shift``; below it: none) renumbered over the names the
    items ``used_items`` use, in their first order, and those names."""
    counts = torch.bincount(ids[used_items], minlength=len(names) + shift).tolist()
    used = [i for i, n in enumerate(counts) if n]
    used = [u for u in used if u >= shift]
    if len(used) == len(names):
        return ids, names
    remap = torch.zeros(len(names) + shift, dtype=torch.int64)
    for new, old in enumerate(used):
        remap[old] = new + shift
    return remap[ids], [names[old - shift] for old in used]


def located_table(md: Metadata, batches: Sequence[LocationColumns], name: str) -> ChunkTable:
    """The chunk table of ``md``: a row per tensor chunk (in each entry's order) and per
    object stored in a file, with the locations ``batches`` give (every writer's items,
    in rank order; of items given twice, the last). An item is placed by its key and
    hint, checked against the chunk's offsets, else by its offsets; an item of no
    chunk or object of ``md`` is left out, as a version-1 manifest leaves it out."""
    with one_thread():
        return _located_table(md, batches, name)


def _located_table(md: Metadata, batches: Sequence[LocationColumns], name: str) -> ChunkTable:
    geo = _Geometry(md)
    nentries = len(geo.fqns)
    counts = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    items = int(counts.sum())
    key_counts = torch.tensor([len(b.name_lengths) for b in batches], dtype=torch.int64)
    key = _gathered(batches, "key").to(torch.int64) + torch.repeat_interleave(
        torch.cumsum(key_counts, 0) - key_counts, counts
    )
    found = _entries_of_keys(batches, geo.fqns).index_select(0, key)
    entry = torch.where(found >= 0, found, nentries)  # the last entry (of none) for none
    ndim = _gathered(batches, "ndim").to(torch.int64)
    hint = _gathered(batches, "hint").to(torch.int64)
    kind = geo.kind[entry]
    objects = (ndim == -1) & (kind == _OBJECT) if items and int(ndim.min()) < 0 else None
    per_entry = geo.count.clone()
    if objects is not None and bool(objects.any()):
        per_entry.index_fill_(0, entry[objects], 1)
    first = torch.cumsum(per_entry, 0) - per_entry
    rows = int(per_entry.sum())
    row = torch.full_like(entry, -1) if objects is None else torch.where(objects, first[entry], -1)
    tensors = (kind == _TENSOR) & (ndim == geo.ndim[entry])
    _place_tensors(geo, batches, row, tensors, entry, ndim, hint, first)

    # The last item placed on each row wins (unplaced ones go to a spare row, dropped).
    winner = torch.full((rows + 1,), -1, dtype=torch.int64)
    spare = torch.where(row >= 0, row, rows)
    winner = winner.scatter_reduce_(0, spare, torch.arange(items, dtype=torch.int64), "amax")[:rows]
    every = items == rows and bool((winner >= 0).all())
    w = winner if every else winner[winner >= 0]
    at = None if every else torch.nonzero(winner >= 0).flatten()

    def column(values: torch.Tensor, fill: int = 0) -> torch.Tensor:
        if at is None:
            return values.index_select(0, w)
        chosen = values.index_select(0, w)
        return torch.full((rows,), fill, dtype=values.dtype).index_copy_(0, at, chosen)

    files, file = _global_ids(batches, "files", "file", counts)
    codecs, codec = _global_ids(batches, "codecs", "codec", counts)
    if not every:  # every item placed: each name a batch lists is used (LocationColumns.of)
        file, files = _only_used(file, w, files, 0)
        codec, codecs = _only_used(codec, w, codecs, 1)
    has_digest = _gathered(batches, "has_digest")
    length, block = _gathered(batches, "length"), _gathered(batches, "block")
    columns = TableColumns(
        torch.repeat_interleave(torch.arange(nentries, dtype=torch.int64), per_entry[:nentries]),
        column(file, -1),
        column(_gathered(batches, "offset")),
        column(length),
        column(block),
        geo.offsets,
        geo.sizes,
        _crcs_of(_gathered(batches, "crcs"), crc_counts(length, block), w),
        column(codec).to(torch.uint8),
        column(has_digest),
        _digests_of(batches, has_digest, w),
    )
    return ChunkTable(encode_table(columns, nentries), files, codecs, entry_shapes(md), name)


def _place_tensors(
    geo: _Geometry,
    batches: Sequence[LocationColumns],
    row: torch.Tensor,
    tensors: torch.Tensor,
    entry: torch.Tensor,
    ndim: torch.Tensor,
    hint: torch.Tensor,
    first: torch.Tensor,
) -> None:
    """Set ``row`` of each tensor item: its hint's row when that chunk has the item's
    offsets (checked at once), else the row of the entry's chunk with those offsets."""
    if not bool(tensors.any()):
        return
    offsets = _gathered(batches, "offsets")
    item_nd = ndim.clamp(min=0)
    item_start = torch.cumsum(item_nd, 0) - item_nd
    hinted = tensors & (hint >= 0) & (hint < geo.count[entry])
    every = bool(hinted.all())
    at = torch.nonzero(hinted).flatten() if not every else None
    nd, e, h = (item_nd, entry, hint) if at is None else (item_nd[at], entry[at], hint[at])
    mine = offsets if at is None else offsets[_ranges(item_start[at], nd)]
    chunk = geo.offsets.index_select(0, _ranges(geo.dim_start[e] + h * nd, nd))
    if not mine.numel():
        wrong = torch.zeros(nd.numel(), dtype=torch.bool)
    elif int(nd.min()) == int(nd.max()):
        wrong = (mine != chunk).reshape(nd.numel(), -1).any(1)
    else:
        owner = torch.repeat_interleave(torch.arange(nd.numel(), dtype=torch.int64), nd)
        misses = torch.zeros(nd.numel(), dtype=torch.int64)
        wrong = misses.index_add_(0, owner, (mine != chunk).long()) > 0
    placed = torch.where(wrong, -1, first[e] + h)
    if at is None:
        row.copy_(placed)
    else:
        row.index_copy_(0, at, placed)
    rest = tensors & (row < 0)
    if bool(rest.any()):
        pending = torch.nonzero(rest).flatten().tolist()
        _place_by_offsets(geo, row, pending, entry, item_nd, item_start, offsets, first)


def _place_by_offsets(
    geo: _Geometry,
    row: torch.Tensor,
    pending: list[int],
    entry: torch.Tensor,
    nd: torch.Tensor,
    start: torch.Tensor,
    offsets: torch.Tensor,
    first: torch.Tensor,
) -> None:
    """The rows of items without a usable hint, looked up by their offsets (each entry's
    chunks indexed once; the first chunk with those offsets, as a version-1 manifest)."""
    by_entry: dict[int, dict[tuple[int, ...], int]] = {}
    for i in pending:
        e, n, s = int(entry[i]), int(nd[i]), int(start[i])
        found = by_entry.get(e)
        if found is None:
            found = by_entry[e] = {}
            base, ndim, chunks = int(geo.dim_start[e]), int(geo.ndim[e]), int(geo.count[e])
            flat = geo.offsets[base : base + chunks * ndim].tolist()
            for c in range(chunks - 1, -1, -1):
                found[tuple(flat[c * ndim : (c + 1) * ndim])] = int(first[e]) + c
        row[i] = found.get(tuple(offsets[s : s + n].tolist()), -1)


def _crcs_of(values: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The crc32c values (``counts`` per item, one item after another) of items ``w``."""
    if not values.numel() or not w.numel():
        return torch.zeros(0, dtype=torch.int32)
    return values.index_select(0, _ranges((torch.cumsum(counts, 0) - counts)[w], counts[w]))


def _digests_of(batches: Sequence[LocationColumns], has_digest: torch.Tensor, w: torch.Tensor) -> bytes:
    """The digests of items ``w`` that have one, one after another."""
    raw = bytearray().join(b.digests for b in batches)
    if not raw:
        return b""
    digests = torch.frombuffer(raw, dtype=torch.uint8).reshape(-1, DIGEST)
    which = torch.cumsum(has_digest.to(torch.int64), 0) - 1
    chosen = w[has_digest[w] == 1]
    chosen_digests = digests[which[chosen]].reshape(-1).contiguous()  # held while viewed
    return bytes(tensor_bytes(chosen_digests))


def locations_table(md: Metadata, located: Mapping[MetadataIndex, StorageInfo], name: str) -> ChunkTable:
    """The chunk table of ``md`` with locations given as objects (one object per item)."""
    indices = list(located)
    infos = list(located.values())
    return located_table(md, [LocationColumns.of(indices, infos, [0] * len(infos))] if indices else [], name)


def attach_locations(md: Metadata, batches: Sequence[LocationColumns], name: str) -> None:
    """Record the locations ``batches`` give in ``md`` as its chunk table's columns, as a
    load reads them: ``storage_data`` a :class:`TableLocations`, each tensor's chunks a
    :class:`TableChunks` (new entry objects: ``md``'s entries are not changed in place)."""
    table = located_table(md, batches, name)
    entries: dict[str, STORAGE_TYPES] = {}
    for e, (fqn, meta) in enumerate(md.state_dict_metadata.items()):
        if isinstance(meta, TensorStorageMetadata):
            meta = TensorStorageMetadata(meta.properties, meta.size, TableChunks(table, e))
        entries[fqn] = meta
    md.state_dict_metadata = entries
    md.storage_data = TableLocations(table)
