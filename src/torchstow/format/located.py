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
from itertools import chain, compress, pairwise, repeat
from operator import attrgetter, is_not, itemgetter
from typing import Any

import torch

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


def key_hash(name: bytes) -> int:
    """A key's 64-bit name hash (the same on every rank; Python's ``hash`` is not)."""
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little", signed=True)


class LocationColumns:
    """The locations of the items one writer wrote, as columns, in the order written.

    Keys are named once each (``names``: their UTF-8 bytes one after another, with
    ``name_lengths`` and ``name_hashes``); per item: ``key`` (into them), ``hint``
    (the chunk's position in its entry, -1: none), ``ndim`` (-1: an object, whose key
    has no offsets) with the chunk's ``offsets`` flat; ``file`` (into ``files``),
    ``offset``, ``length``, ``block``, ``crc_count`` with the ``crcs`` flat, ``codec``
    (0: none, i: ``codecs[i - 1]``), ``has_digest`` with the 32-byte ``digests`` of the
    items that have one, and ``written`` (bytes this save wrote for it: 0 for an item
    shared with an incremental save's base).
    """

    __slots__ = (
        "block",
        "codec",
        "codecs",
        "crc_count",
        "crcs",
        "digests",
        "file",
        "files",
        "has_digest",
        "hint",
        "key",
        "length",
        "name_hashes",
        "name_lengths",
        "names",
        "ndim",
        "offset",
        "offsets",
        "written",
    )

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
        return cls(
            names=b"".join(encoded),
            name_lengths=array("q", map(len, encoded)),
            name_hashes=array("q", map(key_hash, encoded)),
            key=array("q", map(ids.__getitem__, fqns)),
            hint=array("q", hints),
            ndim=array("q", [len(o) if t else -1 for o, t in zip(offsets, tensor, strict=True)]),
            offsets=array("q", chain.from_iterable(compress(offsets, tensor))),
            files=files,
            file=array("q", map(file_ids.__getitem__, paths)),
            offset=array("q", map(itemgetter(1), fields)),
            length=array("q", map(itemgetter(2), fields)),
            block=array("q", map(itemgetter(3), fields)),
            crc_count=array("q", map(len, checksums)),
            crcs=array("I", chain.from_iterable(checksums)),
            codecs=codecs,
            codec=array("B", map(codec_ids.__getitem__, codec_names)),
            has_digest=array("B", map(is_not, hashes, repeat(None))),
            digests=_digest_bytes(hashes),
            written=array("q", written),
        )

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
        at_dim = at_crc = at_digest = 0
        for i in range(len(self.key)):
            nd = self.ndim[i]
            offsets = None
            if nd >= 0:
                offsets = torch.Size(self.offsets[at_dim : at_dim + nd])
                at_dim += nd
            hint = self.hint[i]
            index = MetadataIndex(names[self.key[i]], offsets, None if hint < 0 else hint)
            crcs = tuple(self.crcs[at_crc : at_crc + self.crc_count[i]])
            at_crc += self.crc_count[i]
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
    """The indices ``starts[i] .. starts[i] + counts[i] - 1`` of every ``i``, one range after another."""
    firsts = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(firsts, counts)
    return torch.repeat_interleave(starts, counts) + within


def _starts(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


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


def entry_shapes(md: Metadata) -> list[EntryShape]:
    """What a chunk table needs of ``md``'s entries (as its JSON would give them)."""
    shapes = []
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            shapes.append(EntryShape(fqn, None, 0, 0 if meta.encoding == "json" else 1))
        else:
            shapes.append(EntryShape(fqn, tuple(meta.size), meta.properties.dtype.itemsize, -1))
    return shapes


def _int64(data: Any) -> torch.Tensor:
    """An int64 tensor over a copy of ``data``'s bytes (bytes, arrays, joined)."""
    return _tensor(data, torch.int64)


def _tensor(data: Any, dtype: torch.dtype) -> torch.Tensor:
    buffer = bytearray(data)
    if not buffer:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype)


def _joined(parts: Sequence[Any], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return _tensor(bytearray().join(parts), dtype)


class _Geometry:
    """The rows of the table before their locations: per entry its chunk count (a
    tensor's), dimensions and whether it is an object stored in a file; every tensor
    chunk's offsets and sizes, flat, in entry order."""

    def __init__(self, md: Metadata) -> None:
        entries = md.state_dict_metadata
        self.fqns = list(entries)
        count, ndim, kind = array("q"), array("q"), array("q")  # kind: 1 tensor, 2 stored object, 0 json
        offsets: list[Any] = []
        sizes: list[Any] = []
        layouts: dict[tuple[int, int, int], list[tuple[list[Any], array[int], array[int]]]] = {}
        for fqn, meta in entries.items():
            if isinstance(meta, BytesStorageMetadata):
                count.append(0)
                ndim.append(0)
                kind.append(0 if meta.encoding == "json" else 2)
                continue
            nd = len(meta.size)
            chunks = meta.chunks
            o, s = self._layout(chunks, layouts)
            if len(o) != len(chunks) * nd or len(s) != len(o):
                raise ValueError(f"{fqn}: a chunk's offsets or sizes do not have {nd} values")
            count.append(len(chunks))
            ndim.append(nd)
            kind.append(1)
            offsets.append(o)
            sizes.append(s)
        self.count, self.ndim, self.kind = _int64(count), _int64(ndim), _int64(kind)
        self.offsets, self.sizes = _joined(offsets), _joined(sizes)
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
    """The entry each batch's key names (-1: none), every batch's keys one after another:
    by their name hashes, then checked exactly (the names' bytes compared at once)."""
    names = b"".join(b.names for b in batches)
    lengths = _joined([b.name_lengths for b in batches])
    hashes = _joined([b.name_hashes for b in batches])
    encoded = [fqn.encode() for fqn in fqns]
    known = torch.tensor([key_hash(e) for e in encoded] or [0], dtype=torch.int64)[: len(fqns)]
    order = torch.argsort(known)
    ordered = known[order]
    if len(fqns) and hashes.numel() and bool((ordered[1:] != ordered[:-1]).all()):
        at = torch.searchsorted(ordered, hashes).clamp(max=len(fqns) - 1)
        found = ordered[at] == hashes
        if bool(found.all()):
            entry = order[at]
            sizes = torch.tensor(list(map(len, encoded)), dtype=torch.int64)
            same = b"".join(map(encoded.__getitem__, entry.tolist())) == names
            if same and torch.equal(sizes[entry], lengths):
                return entry
    # Some key is not an entry's (or two names share a hash): name by name.
    ids = {e: i for i, e in enumerate(encoded)}
    starts = _starts(lengths.tolist())
    return torch.tensor([ids.get(names[a:b], -1) for a, b in pairwise(starts)], dtype=torch.int64)


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
    local = _joined([getattr(b, column) for b in batches], torch.uint8 if codecs else torch.int64)
    return merged, _joined(maps)[local.to(torch.int64) + base]


def _only_used(
    ids: torch.Tensor, w: torch.Tensor, names: list[str], shift: int
) -> tuple[torch.Tensor, list[str]]:
    """``ids`` (counting from ``shift``; below it: none) renumbered over the names the
    located items ``w`` use, in their first order, and those names."""
    used = [u for u in (torch.unique(ids[w]).tolist() if w.numel() else []) if u >= shift]
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
    key_sizes = torch.tensor([len(b.name_lengths) for b in batches], dtype=torch.int64)
    key = _joined([b.key for b in batches]) + torch.repeat_interleave(
        torch.cumsum(key_sizes, 0) - key_sizes, counts
    )
    entry = _entries_of_keys(batches, geo.fqns)[key] if items else torch.zeros(0, dtype=torch.int64)
    ndim = _joined([b.ndim for b in batches])
    hint = _joined([b.hint for b in batches])
    known = entry >= 0
    safe = entry.clamp(min=0)
    kind = geo.kind[safe] if nentries else torch.zeros(items, dtype=torch.int64)
    objects = known & (ndim == -1) & (kind == 2)
    tensors = known & (kind == 1) & (ndim == geo.ndim[safe] if nentries else known)
    located_objects = torch.zeros(nentries, dtype=torch.int64)
    located_objects[entry[objects]] = 1
    per_entry = geo.count + located_objects
    first = torch.cumsum(per_entry, 0) - per_entry
    rows = int(per_entry.sum())
    row = torch.full((items,), -1, dtype=torch.int64)
    row[objects] = first[entry[objects]]
    _place_tensors(geo, batches, row, tensors, entry, ndim, hint, first)

    placed = row >= 0
    winner = torch.full((rows,), -1, dtype=torch.int64)
    winner.scatter_reduce_(0, row[placed], torch.arange(items, dtype=torch.int64)[placed], "amax")
    located = winner >= 0
    w = winner[located]

    files, file = _global_ids(batches, "files", "file", counts)
    codecs, codec = _global_ids(batches, "codecs", "codec", counts)
    file, files = _only_used(file, w, files, 0)
    codec, codecs = _only_used(codec, w, codecs, 1)

    def column(values: torch.Tensor, fill: int = 0) -> torch.Tensor:
        out = torch.full((rows,), fill, dtype=torch.int64)
        out[located] = values[w]
        return out

    has_digest = _joined([b.has_digest for b in batches], torch.uint8).to(torch.int64)
    columns = TableColumns(
        torch.repeat_interleave(torch.arange(nentries, dtype=torch.int64), per_entry),
        column(file, -1),
        column(_joined([b.offset for b in batches])),
        column(_joined([b.length for b in batches])),
        column(_joined([b.block for b in batches])),
        geo.offsets,
        geo.sizes,
        _crcs_of(batches, w),
        column(codec).to(torch.uint8),
        column(has_digest).to(torch.uint8),
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
    offsets = _joined([b.offsets for b in batches])
    flat = geo.offsets
    item_nd = ndim.clamp(min=0)
    item_start = torch.cumsum(item_nd, 0) - item_nd
    count = geo.count[entry.clamp(min=0)]
    hinted = tensors & (hint >= 0) & (hint < count)
    at = torch.nonzero(hinted).flatten()
    nd = item_nd[at]
    e = entry[at]
    mine = offsets[_ranges(item_start[at], nd)]
    chunk = flat[_ranges(geo.dim_start[e] + hint[at] * nd, nd)]
    wrong = torch.zeros(at.numel(), dtype=torch.int64)
    item_of_dim = torch.repeat_interleave(torch.arange(at.numel(), dtype=torch.int64), nd)
    wrong.index_add_(0, item_of_dim, (mine != chunk).long())
    good = wrong == 0
    row[at[good]] = first[e[good]] + hint[at[good]]
    rest = tensors.clone()
    rest[at[good]] = False
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
    flat = geo.offsets.numpy()
    item_offsets = offsets.tolist()
    by_entry: dict[int, dict[tuple[int, ...], int]] = {}
    for i in pending:
        e, n, s = int(entry[i]), int(nd[i]), int(start[i])
        found = by_entry.get(e)
        if found is None:
            found = by_entry[e] = {}
            base, ndim, chunks = int(geo.dim_start[e]), int(geo.ndim[e]), int(geo.count[e])
            for c in range(chunks - 1, -1, -1):
                found[tuple(flat[base + c * ndim : base + (c + 1) * ndim].tolist())] = int(first[e]) + c
        row[i] = found.get(tuple(item_offsets[s : s + n]), -1)


def _crcs_of(batches: Sequence[LocationColumns], w: torch.Tensor) -> torch.Tensor:
    """The crc32c values of items ``w``, one item after another."""
    values = _joined([b.crcs for b in batches], torch.int32)  # the bits of each uint32
    counts = _joined([b.crc_count for b in batches])
    if not values.numel() or not w.numel():
        return torch.empty(0, dtype=torch.int32)
    return values[_ranges((torch.cumsum(counts, 0) - counts)[w], counts[w])]


def _digests_of(batches: Sequence[LocationColumns], has_digest: torch.Tensor, w: torch.Tensor) -> bytes:
    """The digests of items ``w`` that have one, one after another."""
    raw = b"".join(b.digests for b in batches)
    if not raw:
        return b""
    digests = _tensor(raw, torch.uint8).reshape(-1, DIGEST)
    which = torch.cumsum(has_digest, 0) - 1
    chosen = w[has_digest[w] == 1]
    return digests[which[chosen]].reshape(-1).numpy().tobytes()


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
