"""The manifest's codec: an encoder for each version it writes (version 2 by default,
version 1 on request) and a decoder per format version, so a newer version can be
added without breaking older readers.

A version-2 manifest is JSON plus its chunk table (:mod:`torchstow.format.table`),
a file of its own: :func:`encode_manifest` gives both, :func:`decode_metadata`
reads the table through the ``read_file`` it is given.

Decoding goes straight into the typed structs of :mod:`torchstow.format.schema`
(:mod:`msgspec`): a field of the wrong
type, a missing one, or a value out of place is a :class:`CorruptCheckpointError`
naming where it is; a newer version than this torchstow knows is a
:class:`FormatVersionError`. Nothing is ever unpickled.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any, NamedTuple

import blake3
import msgspec
import torch

from torchstow.errors import CorruptCheckpointError, FormatVersionError
from torchstow.format.bulk import chunked_entries_ok
from torchstow.format.checksums import ALGORITHM, check_algorithm
from torchstow.format.compression import CODECS
from torchstow.format.decoded import build_metadata, document_metadata
from torchstow.format.files import (
    CHUNK_TABLE_MAX_BYTES,
    MANIFEST_MAX_BYTES,
    chunk_table_name,
    is_chunk_table,
    too_large,
)
from torchstow.format.located import locations_table
from torchstow.format.manifest import (
    FORMAT_VERSION,
    STORAGE_TYPES,
    BytesStorageMetadata,
    Metadata,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
    dtype_from_name,
    dtype_name,
)
from torchstow.format.schema import (
    Checksum,
    ChecksumV2,
    Chunk,
    ChunkTableRef,
    Document,
    DocumentV2,
    Entry,
    EntryV2,
    Header,
    PlainDocument,
    PlainEntry,
    RangedDocument,
)
from torchstow.format.table import ChunkTable, EntryShape, TableChunks, TableLocations, crc_counts
from torchstow.format.validation import check_manifest

FORMAT_NAME = "torchstow"
WRITTEN_VERSIONS = (1, 2)
"""The format versions this torchstow writes (``save(..., format_version=)``)."""

__all__ = [
    "DECODERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WRITTEN_VERSIONS",
    "Encoded",
    "ManifestPeek",
    "ReadFile",
    "check_format_version",
    "decode_metadata",
    "encode_manifest",
    "encode_metadata",
    "peek_manifest",
]

ReadFile = Callable[[str, int], "bytes | None"]
"""Reads a file beside the manifest (a version-2 manifest's chunk table) by name: its
bytes, or None where it is missing; the second argument is the most bytes the file should
hold, a file holding more is refused (``core.storage.store.read_capped``) or returned whole."""


class _Locations:
    """File names become indices into ``files``; the checksum block size is
    stated once, on a location only where it differs."""

    def __init__(self, block_size: int) -> None:
        self.files: list[str] = []
        self.ids: dict[str, int] = {}
        self.block_size = block_size

    def file_id(self, name: str) -> int:
        """The index of ``name`` in ``files`` (added on first use)."""
        file_id = self.ids.get(name)
        if file_id is None:
            file_id = self.ids[name] = len(self.files)
            self.files.append(name)
        return file_id


_OFFSETS = attrgetter("offsets")


def _encode_locations(
    storage_data: dict[Any, StorageInfo], locations: _Locations
) -> dict[str, dict[Any, Chunk]]:
    """Every location as the struct it is written as, by key and chunk offsets (each
    made in one call; a chunk's ``sizes`` are filled in by its entry)."""
    by_fqn: dict[str, dict[Any, Chunk]] = {}
    ids = locations.ids
    block_size = locations.block_size
    for index, info in storage_data.items():
        file_id = ids.get(info.relative_path)
        if file_id is None:
            file_id = locations.file_id(info.relative_path)
        block = info.block_size
        located = Chunk(
            file_id,
            info.offset,
            info.length,
            info.checksums,
            None if block == block_size else block,
            info.content_hash,
            info.codec,
            offsets=index.offset,
            sizes=(),  # filled in by its entry
        )
        try:
            by_fqn[index.fqn][index.offset] = located
        except KeyError:
            by_fqn[index.fqn] = {index.offset: located}
    return by_fqn


def _locate(raw: Entry, located: Chunk | None) -> Entry:
    """``raw`` with the location of an item stored whole (an object, a tensor in one chunk)."""
    if located is not None:
        raw.file, raw.offset, raw.length = located.file, located.offset, located.length
        raw.crc32c, raw.block, raw.blake3 = located.crc32c, located.block, located.blake3
        raw.codec = located.codec
    return raw


def _encode_entry(entry: STORAGE_TYPES, located: dict[Any, Chunk]) -> Entry:
    if isinstance(entry, BytesStorageMetadata):
        value = entry.value if entry.encoding == "json" else None
        return _locate(Entry(encoding=entry.encoding, value=value), located.get(None))
    raw: Entry[Any, Any, Any] = Entry(
        dtype=dtype_name(entry.properties.dtype),
        shape=entry.size,
        requires_grad=entry.properties.requires_grad,
    )
    chunks = entry.chunks
    if len(chunks) == 1 and chunks[0].sizes == entry.size and not any(chunks[0].offsets):
        return _locate(raw, located.get(chunks[0].offsets))
    try:
        raw.chunks = list(map(located.__getitem__, map(_OFFSETS, chunks)))
    except KeyError:  # a chunk without a location: written with its geometry alone
        raw.chunks = [
            located.get(chunk.offsets) or Chunk(offsets=chunk.offsets, sizes=()) for chunk in chunks
        ]
    for out, chunk in zip(raw.chunks, chunks, strict=True):
        out.sizes = chunk.sizes
    return raw


def _is_locations(storage_data: Any) -> bool:
    """Whether ``storage_data`` maps items to :class:`StorageInfo` (as
    :func:`~torchstow.format.manifest.inline_locations` says)."""
    if isinstance(storage_data, TableLocations):
        return True
    if not isinstance(storage_data, dict):
        return False
    kinds = {*map(type, storage_data.values())}
    return kinds <= {StorageInfo} or all(isinstance(info, StorageInfo) for info in storage_data.values())


def encode_metadata(md: Metadata) -> bytes:
    """Serialize a manifest to version-1 UTF-8 JSON: one self-contained document,
    whatever ``md.version`` says (:func:`encode_manifest` writes ``md.version``).

    Locations recorded as :class:`StorageInfo` are written into the entry
    they belong to; any other ``storage_data`` must itself be JSON. A tensor
    stored as one whole chunk keeps its location on the entry itself.
    """
    storage = md.storage_data
    inline = _is_locations(storage)
    if isinstance(storage, TableLocations) and _same_table(md, storage.table):
        entries, files, block_size = _v1_entries_of_table(md, storage.table)
    else:
        block_size = 0
        if inline:
            block_size = next((info.block_size for info in storage.values() if info.block_size), 0)
        locations = _Locations(block_size)
        by_fqn = _encode_locations(storage, locations) if inline else {}
        no_locations: dict[Any, Chunk] = {}
        entries = {
            fqn: _encode_entry(entry, by_fqn.get(fqn, no_locations))
            for fqn, entry in md.state_dict_metadata.items()
        }
        files = locations.files
    doc = Document(
        format=FORMAT_NAME,
        version=1,
        torch_version=str(md.torch_version),
        committed_at=md.committed_at,
        user_metadata=md.user_metadata,
        checksum=Checksum(ALGORITHM, block_size),
        files=files,
        planner_data=md.planner_data,
        entries=entries,
        storage_data=md.storage_data if not inline and md.storage_data is not None else msgspec.UNSET,
        nbytes_written=md.nbytes_written,
        save_id=md.save_id,
        save_seconds=md.save_seconds,
    )
    try:
        return msgspec.json.encode(doc)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"the checkpoint manifest is not JSON-serializable: {exc}") from exc


def _v1_entries_of_table(md: Metadata, table: ChunkTable) -> tuple[dict[str, Entry], list[str], int]:
    """``md``'s version-1 entries, files and checksum block size made from the columns of
    its chunk table (one :func:`_same_table` found to be ``md``'s): a :class:`Chunk` per
    row and no other object per item. The same document :func:`_encode_locations` makes
    from :class:`StorageInfo` objects: files in order of first use, the block size of the
    first located row with one."""
    file = table.column("file")
    located = file >= 0
    order = list(dict.fromkeys(file[located].tolist()))  # file ids in order of first use
    renumber = torch.full((len(table.files),), -1, dtype=torch.int64)
    renumber[order] = torch.arange(len(order))
    block = table.column("block")
    blocks = block[located & (block != 0)]
    block_size = int(blocks[0]) if blocks.numel() else 0
    file_ids = torch.where(located, renumber[file.clamp(min=0)], -1).tolist()
    offsets, lengths = table.column("offset").tolist(), table.column("length").tolist()
    block_of = [None if b == block_size else b for b in block.tolist()]
    crcs = (table.column("crcs").to(torch.int64) & 0xFFFFFFFF).tolist()  # stored unsigned
    crc_at = [0, *torch.cumsum(crc_counts(table.column("length"), block), 0).tolist()]
    names = [None, *table.codecs]
    codecs = [names[c] for c in table.column("codec").tolist()]
    raw = table.column("digests").numpy().tobytes()
    hexes = iter([raw[i : i + 32].hex() for i in range(0, len(raw), 32)])
    digests = [next(hexes) if has else None for has in table.column("has_digest").tolist()]

    def chunks(lo: int, hi: int, ats: list[tuple[Any, ...]], sizes: list[tuple[Any, ...]]) -> list[Chunk]:
        """Rows ``lo`` to ``hi`` (their chunk ``ats`` and ``sizes``) as written."""
        return [
            Chunk(f, o, n, tuple(crcs[a:b]), bl, d, c, offsets=at, sizes=size)
            if f >= 0
            else Chunk(offsets=at, sizes=size)
            for f, o, n, a, b, bl, d, c, at, size in zip(
                file_ids[lo:hi],
                offsets[lo:hi],
                lengths[lo:hi],
                crc_at[lo:hi],
                crc_at[lo + 1 : hi + 1],
                block_of[lo:hi],
                digests[lo:hi],
                codecs[lo:hi],
                ats,
                sizes,
                strict=True,
            )
        ]

    entries: dict[str, Entry] = {}
    starts = table.starts
    for e, (fqn, entry) in enumerate(md.state_dict_metadata.items()):
        lo, hi = starts[e], starts[e + 1]
        if isinstance(entry, BytesStorageMetadata):
            value = entry.value if entry.encoding == "json" else None
            raw_entry: Entry[Any, Any, Any] = Entry(encoding=entry.encoding, value=value)
            entries[fqn] = _locate(raw_entry, chunks(lo, hi, [()], [()])[0] if hi > lo else None)
            continue
        raw_entry = Entry(
            dtype=dtype_name(entry.properties.dtype),
            shape=entry.size,
            requires_grad=entry.properties.requires_grad,
        )
        nd = table.ndim[e]
        flat_at, flat_size = (view.tolist() for view in table.layout(e))
        ats = list(zip(*(flat_at[d::nd] for d in range(nd)), strict=True)) if nd else [()] * (hi - lo)
        sizes = list(zip(*(flat_size[d::nd] for d in range(nd)), strict=True)) if nd else ats
        made = chunks(lo, hi, ats, sizes)
        if hi - lo == 1 and sizes[0] == tuple(entry.size) and not any(ats[0]):
            entries[fqn] = _locate(raw_entry, made[0] if made[0].file is not None else None)
            continue
        raw_entry.chunks = made
        entries[fqn] = raw_entry
    return entries, [table.files[i] for i in order], block_size


class Encoded(NamedTuple):
    """An encoded manifest: its JSON, and the files it names that must be written
    before it is published (a version-2 manifest's chunk table), by name."""

    manifest: bytes
    tables: dict[str, bytes]


def check_format_version(version: Any) -> None:
    """ValueError unless ``version`` is a format version this torchstow writes."""
    if type(version) is not int or version not in WRITTEN_VERSIONS:
        raise ValueError(
            f"format_version must be one of {', '.join(map(str, WRITTEN_VERSIONS))}, not {version!r}"
        )


def encode_manifest(md: Metadata, version: int | None = None) -> Encoded:
    """Serialize a manifest in format ``version`` (default ``md.version``); ValueError for
    one larger than a reader reads (:data:`~torchstow.format.files.MANIFEST_MAX_BYTES`, and
    :data:`~torchstow.format.files.CHUNK_TABLE_MAX_BYTES` for its chunk table)."""
    version = md.version if version is None else version
    check_format_version(version)
    encoded = Encoded(encode_metadata(md), {}) if version == 1 else _encode_v2(md)
    hint = " (format version 2 keeps the chunks in a table of their own)" if version == 1 else ""
    if len(encoded.manifest) > MANIFEST_MAX_BYTES:
        raise ValueError(
            f"the checkpoint manifest would be {len(encoded.manifest):,} bytes, more than the "
            f"{MANIFEST_MAX_BYTES:,} a reader reads{hint}"
        )
    for name, table in encoded.tables.items():
        if len(table) > CHUNK_TABLE_MAX_BYTES:
            raise ValueError(
                f"the chunk table {name} would be {len(table):,} bytes, more than the "
                f"{CHUNK_TABLE_MAX_BYTES:,} a reader reads"
            )
    return encoded


def _entry_v2(entry: STORAGE_TYPES) -> EntryV2:
    if isinstance(entry, BytesStorageMetadata):
        return EntryV2(encoding=entry.encoding, value=entry.value if entry.encoding == "json" else None)
    return EntryV2(
        dtype=dtype_name(entry.properties.dtype),
        shape=tuple(entry.size),
        requires_grad=entry.properties.requires_grad,
    )


def _table_of(
    md: Metadata, located: Mapping[Any, StorageInfo], name: str
) -> tuple[bytes, list[str], list[str]]:
    """The chunk table of ``md`` (its bytes, files and codecs) with its ``located``
    locations: the table they are already the columns of (a manifest saved or loaded
    as columns), else built from them (:func:`~torchstow.format.located.located_table`)."""
    if isinstance(located, TableLocations) and _same_table(md, located.table):
        return located.table.data, located.table.files, located.table.codecs
    table = locations_table(md, located, name)
    return table.data, table.files, table.codecs


def _same_table(md: Metadata, table: ChunkTable) -> bool:
    """Whether ``md``'s entries are those ``table`` was decoded with, chunks unchanged
    (then its bytes are written again as they are)."""
    if len(md.state_dict_metadata) != len(table.entries):
        return False
    for (fqn, entry), known in zip(md.state_dict_metadata.items(), table.entries, strict=True):
        if fqn != known.fqn:
            return False
        if isinstance(entry, BytesStorageMetadata):
            if known.shape is not None:
                return False
            continue
        chunks = entry.chunks
        if (
            not isinstance(chunks, TableChunks)
            or chunks._table.data is not table.data  # the same bytes (a renamed table shares them)
            or tuple(entry.size) != known.shape
            or (chunks._list is not None and chunks._list != table.chunks(chunks._entry))
        ):
            return False
    return True


def _encode_v2(md: Metadata) -> Encoded:
    storage = md.storage_data
    located = _is_locations(storage)  # one pass over the locations, for both uses
    name = chunk_table_name(md.save_id or uuid.uuid4().hex)
    if not is_chunk_table(name):
        raise ValueError(f"save id {md.save_id!r} cannot name a chunk table")
    table, files, codecs = _table_of(md, storage if located else {}, name)
    custom = storage if storage is not None and not located else msgspec.UNSET
    doc = DocumentV2(
        format=FORMAT_NAME,
        version=2,
        torch_version=str(md.torch_version),
        committed_at=md.committed_at,
        user_metadata=md.user_metadata,
        checksum=ChecksumV2(ALGORITHM),
        files=files,
        codecs=codecs,
        chunk_table=ChunkTableRef(name, len(table), blake3.blake3(table).hexdigest()),
        planner_data=md.planner_data,
        entries={fqn: _entry_v2(entry) for fqn, entry in md.state_dict_metadata.items()},
        storage_data=custom,
        nbytes_written=md.nbytes_written,
        save_id=md.save_id,
        save_seconds=md.save_seconds,
    )
    try:
        return Encoded(msgspec.json.encode(doc), {name: table})
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"the checkpoint manifest is not JSON-serializable: {exc}") from exc


class _RawEntriesV1(msgspec.Struct):
    """Only the entries, each kept raw: decoded one by one, a type error names its key."""

    entries: dict[str, msgspec.Raw] = {}


_entry_decoder = msgspec.json.Decoder(PlainEntry)


def _name_the_entry(
    data: bytes, error: msgspec.ValidationError, entry_decoder: msgspec.json.Decoder[Any] | None = None
) -> CorruptCheckpointError:
    """The error for a field of the wrong type, naming the entry it is in (msgspec's
    path leaves dict keys out) when it is in one."""
    entry_decoder = entry_decoder or _entry_decoder
    try:
        raw_entries = msgspec.json.decode(data, type=_RawEntriesV1).entries
    except msgspec.ValidationError:
        return CorruptCheckpointError(str(error))
    for fqn, raw in raw_entries.items():
        try:
            entry_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            return CorruptCheckpointError(f"entries[{fqn!r}]: {exc}")
    return CorruptCheckpointError(str(error))


_ranged_decoder = msgspec.json.Decoder(RangedDocument)
_plain_decoder = msgspec.json.Decoder(PlainDocument)


def _decode_v1(data: bytes) -> Metadata:
    doc: Any
    try:
        doc = _ranged_decoder.decode(data)
        checked = chunked_entries_ok(doc.entries, len(doc.files), doc.checksum.block_size)
    except msgspec.ValidationError:  # a type, or an integer out of range: say which
        try:
            doc = _plain_decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise _name_the_entry(data, exc) from exc
        checked = {}
    check_algorithm(doc.checksum.algorithm)
    typed = doc.entries
    free = [("user_metadata", doc.user_metadata)]
    if doc.storage_data is not msgspec.UNSET:
        free.append(("storage_data", doc.storage_data))
    # Every rule of the format, before anything acts on the manifest.
    check_manifest(
        files=doc.files,
        block_size=doc.checksum.block_size,
        entries=typed,
        planner_data=doc.planner_data,
        free_values=free,
        checked=checked,
    )
    return build_metadata(doc, checked)


_v2_decoder = msgspec.json.Decoder(DocumentV2)
_v2_entry_decoder = msgspec.json.Decoder(EntryV2)


def _read_table(doc: DocumentV2, read_file: ReadFile | None) -> bytes:
    """The chunk table ``doc`` names, checked against the length and digest it records."""
    ref = doc.chunk_table
    name = ref.name
    if not is_chunk_table(name):
        raise CorruptCheckpointError(
            f"chunk_table.name = {name[:60]!r} is not a plain chunk-table name (manifest-*.chunks)"
        )
    if read_file is None:
        raise CorruptCheckpointError(f"its chunk table {name} cannot be read here (no reader was given)")
    if ref.length < 0:
        raise CorruptCheckpointError(f"chunk_table.length = {ref.length} is negative")
    if ref.length > CHUNK_TABLE_MAX_BYTES:
        raise too_large(f"its chunk table {name} ({ref.length:,} bytes, it records)", CHUNK_TABLE_MAX_BYTES)
    try:
        data = read_file(name, ref.length)
    except FileNotFoundError:
        data = None
    if data is None:
        raise CorruptCheckpointError(f"its chunk table {name} is missing: the checkpoint is damaged")
    if len(data) != ref.length:
        raise CorruptCheckpointError(
            f"its chunk table {name} is {len(data)} bytes; the manifest records {ref.length}"
        )
    if blake3.blake3(data).hexdigest() != ref.blake3.lower():
        raise CorruptCheckpointError(
            f"its chunk table {name} does not match the BLAKE3 digest the manifest records"
        )
    return bytes(data)


def _entry_shapes(entries: Mapping[str, EntryV2]) -> list[EntryShape]:
    shapes = []
    for fqn, raw in entries.items():
        if raw.dtype is None:
            shapes.append(EntryShape.of_object(fqn, raw.encoding))
        else:
            assert raw.shape is not None  # the entry rules ask for one
            shapes.append(EntryShape.of_tensor(fqn, raw.shape, dtype_from_name(raw.dtype).itemsize))
    return shapes


def _decode_v2(data: bytes, read_file: ReadFile | None = None) -> Metadata:
    try:
        doc = _v2_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _name_the_entry(data, exc, _v2_entry_decoder) from exc
    check_algorithm(doc.checksum.algorithm)
    free = [("user_metadata", doc.user_metadata)]
    if doc.storage_data is not msgspec.UNSET:
        free.append(("storage_data", doc.storage_data))
    check_manifest(
        files=doc.files, block_size=0, entries=doc.entries, planner_data=doc.planner_data, free_values=free
    )
    for i, codec in enumerate(doc.codecs):
        if not codec or len(codec) > 64 or codec in doc.codecs[:i]:
            raise CorruptCheckpointError(f"codecs[{i}] = {codec[:60]!r} is empty, too long or named twice")
        if codec not in CODECS:
            raise CorruptCheckpointError(
                f"codecs[{i}] = {codec!r} is not one this torchstow knows (known: {', '.join(CODECS)})"
            )
    table = ChunkTable.decode(
        _read_table(doc, read_file),
        files=doc.files,
        codecs=doc.codecs,
        entries=_entry_shapes(doc.entries),
        name=doc.chunk_table.name,
    )
    return _build_v2(doc, table)


def _build_v2(doc: DocumentV2, table: ChunkTable) -> Metadata:
    entries: dict[str, STORAGE_TYPES] = {}
    props_cache: dict[tuple[str, bool], TensorProperties] = {}
    for e, (fqn, raw) in enumerate(doc.entries.items()):
        if raw.dtype is None:
            if raw.encoding is None:
                raise CorruptCheckpointError(f"the entry {fqn!r} has neither a dtype nor an encoding")
            entries[fqn] = BytesStorageMetadata(raw.encoding, raw.value)
            continue
        props = props_cache.get((raw.dtype, raw.requires_grad))
        if props is None:
            props = props_cache[raw.dtype, raw.requires_grad] = TensorProperties(
                dtype_from_name(raw.dtype), raw.requires_grad
            )
        assert raw.shape is not None
        entries[fqn] = TensorStorageMetadata(props, torch.Size(raw.shape), TableChunks(table, e))
    return document_metadata(doc, entries, TableLocations(table))


DECODERS: dict[int, Callable[..., Metadata]] = {1: _decode_v1, 2: _decode_v2}
"""One decoder per format version this torchstow reads: ``decoder(data, read_file)``."""


class _TableName(msgspec.Struct):
    name: str = ""


class _Peek(msgspec.Struct):
    """The fields a manifest names itself by, each checked on its own by :func:`peek_manifest`
    (one of the wrong type spoils only what depends on it); the chunk table's reference is
    kept raw, decoded only for a version-2 torchstow manifest."""

    format: Any = None
    version: Any = None
    save_id: Any = None
    chunk_table: msgspec.Raw = msgspec.Raw(b"null")


class ManifestPeek(NamedTuple):
    """What :func:`peek_manifest` found: a torchstow manifest's save id (any version) and a
    version-2 manifest's chunk table (a plain name); None for what it does not record."""

    save_id: str | None
    chunk_table: str | None


_NOTHING = ManifestPeek(None, None)


def peek_manifest(data: bytes) -> ManifestPeek:
    """The save id and chunk table a manifest records, without decoding the rest of it (nor
    reading its table): one pass over its JSON. Never raises: what is not a torchstow manifest,
    is not JSON, or records either of the wrong type yields None for it."""
    try:
        found = msgspec.json.decode(data, type=_Peek)
    except (msgspec.DecodeError, RecursionError):
        return _NOTHING
    if found.format != FORMAT_NAME:
        return _NOTHING
    save_id = found.save_id if isinstance(found.save_id, str) else None
    if type(found.version) is not int or found.version != 2:
        return ManifestPeek(save_id, None)
    try:
        name = msgspec.json.decode(found.chunk_table, type=_TableName).name
    except (msgspec.DecodeError, RecursionError):
        return ManifestPeek(save_id, None)
    return ManifestPeek(save_id, name if is_chunk_table(name) else None)


def decode_metadata(data: bytes, *, source: str = "manifest", read_file: ReadFile | None = None) -> Metadata:
    """Parse a manifest of any version in :data:`DECODERS`; ``read_file`` reads the files
    beside it (a version-2 manifest's chunk table: see :data:`ReadFile`). Never unpickles."""
    try:
        header = msgspec.json.decode(data, type=Header)
    except RecursionError as exc:
        raise CorruptCheckpointError(f"{source} is not valid JSON: it nests too deep") from exc
    except msgspec.DecodeError as exc:
        if isinstance(exc, msgspec.ValidationError):
            raise CorruptCheckpointError(f"{source} is not a torchstow manifest: {exc}") from exc
        raise CorruptCheckpointError(f"{source} is not valid JSON: {exc}") from exc
    if header.format != FORMAT_NAME:
        raise CorruptCheckpointError(f"{source} is not a torchstow manifest")
    version = header.version
    decoder = DECODERS.get(version) if type(version) is int else None
    if decoder is None:
        if type(version) is int and version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{source} has format version {version!r}; this torchstow reads versions up to "
                f"{FORMAT_VERSION}: upgrade torchstow to read it"
            )
        raise FormatVersionError(
            f"{source} has format version {version!r}, which this torchstow does not read "
            f"(it reads {', '.join(map(str, sorted(DECODERS)))})"
        )
    try:
        return decoder(data, read_file) if version >= 2 else decoder(data)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc}") from exc
    except (msgspec.DecodeError, IndexError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc}") from exc
