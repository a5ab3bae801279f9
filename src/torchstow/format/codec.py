"""The manifest's JSON codec: one encoder (the current version) and a decoder per
format version, so a newer version can be added without breaking older readers.

Decoding goes straight into typed structs (:mod:`msgspec`): a field of the wrong
type, a missing one, or a value out of place is a :class:`CorruptCheckpointError`
naming where it is; a newer version than this torchstow knows is a
:class:`FormatVersionError`. Nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

import msgspec
import torch

from torchstow.errors import CorruptCheckpointError, FormatVersionError
from torchstow.format.bulk import RangedDocument, chunked_entries_ok
from torchstow.format.checksums import DEFAULT_ALGORITHM, check_algorithm
from torchstow.format.manifest import (
    FORMAT_VERSION,
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
    dtype_from_name,
    dtype_name,
    new_storage_info,
)
from torchstow.format.validation import check_manifest

FORMAT_NAME = "torchstow"
_OFFSETS = attrgetter("offsets")
_SIZES = attrgetter("sizes")

__all__ = ["DECODERS", "FORMAT_NAME", "FORMAT_VERSION", "decode_metadata", "encode_metadata"]


class _Located(msgspec.Struct, omit_defaults=True):
    """Where an item's bytes are: a ``file`` index into the manifest's ``files``,
    the byte ``offset`` and ``length`` there, one checksum per ``block`` bytes."""

    file: int | None = None
    offset: int | None = None
    length: int | None = None
    crc32c: tuple[int, ...] | None = None
    block: int | None = None
    blake3: str | None = None


class _Chunk(_Located, kw_only=True, gc=False):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class _Entry(_Located, kw_only=True):
    """A tensor entry (``dtype``, ``shape``, one location or ``chunks``) or an
    object entry (``encoding``, an inline ``value`` or one location)."""

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    requires_grad: bool = False
    chunks: list[_Chunk] | None = None
    encoding: str | None = None
    value: Any = None


class _Checksum(msgspec.Struct):
    algorithm: str = DEFAULT_ALGORITHM
    block_size: int = 0


class _Header(msgspec.Struct):
    format: str = ""
    version: Any = None


class _DocumentV1(msgspec.Struct, kw_only=True):
    format: str
    version: int
    torch_version: str = ""
    committed_at: float | None = None
    user_metadata: dict[str, Any] | None = None
    checksum: _Checksum = msgspec.field(default_factory=_Checksum)
    files: list[str] = []
    planner_data: Any = None
    entries: dict[str, _Entry]
    storage_data: Any = msgspec.UNSET
    nbytes_written: int | None = None
    save_id: str | None = None  # optional within version 1: older manifests lack it, older readers ignore it


class _Locations:
    """File names become indices into ``files``; the checksum block size is
    stated once, on a location only where it differs."""

    def __init__(self, files: list[str] | None = None, block_size: int = 0) -> None:
        self.files = files if files is not None else []
        self.ids = {name: i for i, name in enumerate(self.files)}
        self.block_size = block_size

    def file_id(self, name: str) -> int:
        """The index of ``name`` in ``files`` (added on first use)."""
        file_id = self.ids.get(name)
        if file_id is None:
            file_id = self.ids[name] = len(self.files)
            self.files.append(name)
        return file_id

    def encode(self, info: StorageInfo, out: _Located) -> None:
        out.file = self.file_id(info.relative_path)
        out.offset = info.offset
        out.length = info.length
        out.crc32c = info.checksums
        if info.block_size != self.block_size:
            out.block = info.block_size
        if info.content_hash is not None:
            out.blake3 = info.content_hash

    def decode(self, raw: Any) -> StorageInfo:
        """The location on ``raw`` (a typed entry), which must be complete."""
        if raw.file is None or raw.offset is None or raw.length is None or raw.crc32c is None:
            raise CorruptCheckpointError("a location needs file, offset, length and crc32c")
        return StorageInfo(
            self.files[raw.file],
            raw.offset,
            raw.length,
            tuple(raw.crc32c),
            self.block_size if raw.block is None else raw.block,
            raw.blake3,
        )


def _encode_chunks(
    chunks: list[ChunkStorageMetadata], locs: dict[Any, StorageInfo], locations: _Locations
) -> list[_Chunk]:
    """A tensor's chunks, each with its location: one struct per chunk, built in one call
    (the geometry and checksums go in as the tuples they are; JSON writes them as arrays)."""
    out: list[_Chunk] = []
    append = out.append
    block_size = locations.block_size
    file_ids = locations.ids
    for chunk in chunks:
        offsets = chunk.offsets
        loc = locs.get(offsets)
        if loc is None:
            append(_Chunk(offsets=offsets, sizes=chunk.sizes))
            continue
        file_id = file_ids.get(loc.relative_path)
        if file_id is None:
            file_id = locations.file_id(loc.relative_path)
        block = loc.block_size
        append(
            _Chunk(
                file_id,
                loc.offset,
                loc.length,
                loc.checksums,
                None if block == block_size else block,
                loc.content_hash,
                offsets=offsets,
                sizes=chunk.sizes,
            )
        )
    return out


def _encode_entry(entry: STORAGE_TYPES, locs: dict[Any, StorageInfo], locations: _Locations) -> _Entry:
    if isinstance(entry, BytesStorageMetadata):
        raw = _Entry(encoding=entry.encoding, value=entry.value if entry.encoding == "json" else None)
        loc = locs.get(None)
        if loc is not None:
            locations.encode(loc, raw)
        return raw
    raw = _Entry(
        dtype=dtype_name(entry.properties.dtype),
        shape=entry.size,
        requires_grad=entry.properties.requires_grad,
    )
    chunks = entry.chunks
    if len(chunks) == 1 and chunks[0].sizes == entry.size and not any(chunks[0].offsets):
        loc = locs.get(chunks[0].offsets)
        if loc is not None:
            locations.encode(loc, raw)
        return raw
    raw.chunks = _encode_chunks(chunks, locs, locations)
    return raw


def _locations_by_key(storage_data: Any) -> tuple[dict[str, dict[Any, StorageInfo]], int] | None:
    """``storage_data``'s locations grouped by key, and the first block size; None unless
    it maps items to :class:`StorageInfo` (:func:`inline_locations`), checked in the same pass."""
    if not isinstance(storage_data, dict):
        return None
    by_fqn: dict[str, dict[Any, StorageInfo]] = {}
    block_size = 0
    last_fqn, last = None, {}
    for index, info in storage_data.items():
        if type(info) is not StorageInfo and not isinstance(info, StorageInfo):
            return None
        fqn = index.fqn
        if fqn is not last_fqn:  # a key's items are usually next to each other
            last_fqn, last = fqn, by_fqn.setdefault(fqn, {})
        last[index.offset] = info
        block_size = block_size or info.block_size
    return by_fqn, block_size


def encode_metadata(md: Metadata) -> bytes:
    """Serialize a manifest to UTF-8 JSON in the current format version.

    Locations recorded as :class:`StorageInfo` are written into the entry
    they belong to; any other ``storage_data`` must itself be JSON. A tensor
    stored as one whole chunk keeps its location on the entry itself.
    """
    grouped = _locations_by_key(md.storage_data)
    by_fqn, block_size = grouped if grouped is not None else ({}, 0)
    locations = _Locations(block_size=block_size)
    no_locations: dict[Any, StorageInfo] = {}
    entries = {
        fqn: _encode_entry(entry, by_fqn.get(fqn, no_locations), locations)
        for fqn, entry in md.state_dict_metadata.items()
    }
    inline = grouped is not None
    doc = _DocumentV1(
        format=FORMAT_NAME,
        version=md.version,
        torch_version=str(md.torch_version),
        committed_at=md.committed_at,
        user_metadata=md.user_metadata,
        checksum=_Checksum(DEFAULT_ALGORITHM, block_size),
        files=locations.files,
        planner_data=md.planner_data,
        entries=entries,
        storage_data=md.storage_data if not inline and md.storage_data is not None else msgspec.UNSET,
        nbytes_written=md.nbytes_written,
        save_id=md.save_id,
    )
    try:
        return msgspec.json.encode(doc)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"the checkpoint manifest is not JSON-serializable: {exc}") from exc


def _decode_chunks(
    fqn: str,
    raw: Any,
    files: list[str],
    block_size: int,
    found: dict[MetadataIndex, StorageInfo],
    layouts: dict[tuple[Any, ...], list[ChunkStorageMetadata]],
) -> list[ChunkStorageMetadata]:
    """A tensor's chunks (their geometry shared with every tensor chunked alike) and
    their locations, added to ``found``; the entry is already validated."""
    raw_chunks = raw.chunks
    key = (tuple(map(_OFFSETS, raw_chunks)), tuple(map(_SIZES, raw_chunks)))
    chunks = layouts.get(key)
    if chunks is None:
        chunks = layouts[key] = [
            ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            for offsets, sizes in zip(key[0], key[1], strict=True)
        ]
    index = MetadataIndex.of_chunk
    for i, (chunk, rc) in enumerate(zip(chunks, raw_chunks, strict=True)):
        if rc.file is not None:
            found[index(fqn, chunk.offsets, i)] = new_storage_info(
                files[rc.file],
                rc.offset,
                rc.length,
                tuple(rc.crc32c),
                block_size if rc.block is None else rc.block,
                rc.blake3,
            )
    return list(chunks)


def _decode_tensor(
    fqn: str,
    raw: Any,
    props: TensorProperties,
    locations: _Locations,
    found: dict[MetadataIndex, StorageInfo],
    layouts: dict[tuple[Any, ...], list[ChunkStorageMetadata]],
) -> TensorStorageMetadata:
    if raw.shape is None:
        raise CorruptCheckpointError(f"the tensor entry {fqn!r} has no shape")
    size = torch.Size(raw.shape)
    if raw.chunks is None:
        chunk = ChunkStorageMetadata(torch.Size((0,) * len(size)), size)
        if raw.file is not None:
            found[MetadataIndex(fqn, chunk.offsets, 0)] = locations.decode(raw)
        return TensorStorageMetadata(props, size, [chunk])
    chunks = _decode_chunks(fqn, raw, locations.files, locations.block_size, found, layouts)
    return TensorStorageMetadata(props, size, chunks)


class _RawEntriesV1(msgspec.Struct):
    """Only the entries, each kept raw: decoded one by one, a type error names its key."""

    entries: dict[str, msgspec.Raw] = {}


_entry_decoder = msgspec.json.Decoder(_Entry)


def _name_the_entry(data: bytes, error: msgspec.ValidationError) -> CorruptCheckpointError:
    """The error for a field of the wrong type, naming the entry it is in (msgspec's
    path leaves dict keys out) when it is in one."""
    try:
        raw_entries = msgspec.json.decode(data, type=_RawEntriesV1).entries
    except msgspec.ValidationError:
        return CorruptCheckpointError(str(error))
    for fqn, raw in raw_entries.items():
        try:
            _entry_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            return CorruptCheckpointError(f"entries[{fqn!r}]: {exc}")
    return CorruptCheckpointError(str(error))


_ranged_decoder = msgspec.json.Decoder(RangedDocument)


def _decode_v1(data: bytes) -> Metadata:
    doc: RangedDocument | _DocumentV1
    try:
        doc = _ranged_decoder.decode(data)
        checked = chunked_entries_ok(doc.entries, len(doc.files), doc.checksum.block_size)
    except msgspec.ValidationError:  # a type, or an integer out of range: say which
        try:
            doc = msgspec.json.decode(data, type=_DocumentV1)
        except msgspec.ValidationError as exc:
            raise _name_the_entry(data, exc) from exc
        checked = set()
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
    entries: dict[str, STORAGE_TYPES] = {}
    found: dict[MetadataIndex, StorageInfo] = {}
    locations = _Locations(doc.files, doc.checksum.block_size)
    props_cache: dict[tuple[str, bool], TensorProperties] = {}
    layouts: dict[tuple[Any, ...], list[ChunkStorageMetadata]] = {}
    for fqn, raw in typed.items():
        if raw.dtype is not None:
            key = (raw.dtype, raw.requires_grad)
            props = props_cache.get(key)
            if props is None:
                props = props_cache[key] = TensorProperties(dtype_from_name(raw.dtype), raw.requires_grad)
            entries[fqn] = _decode_tensor(fqn, raw, props, locations, found, layouts)
            continue
        if raw.encoding is None:
            raise CorruptCheckpointError(f"the entry {fqn!r} has neither a dtype nor an encoding")
        entries[fqn] = BytesStorageMetadata(raw.encoding, raw.value)
        if raw.file is not None:
            found[MetadataIndex(fqn)] = locations.decode(raw)
    storage_data = doc.storage_data if doc.storage_data is not msgspec.UNSET else None
    return Metadata(
        state_dict_metadata=entries,
        planner_data=doc.planner_data,
        storage_data=found if found else storage_data,
        user_metadata=doc.user_metadata or {},
        version=doc.version,
        committed_at=doc.committed_at,
        torch_version=doc.torch_version,
        nbytes_written=doc.nbytes_written,
        save_id=doc.save_id,
    )


DECODERS: dict[int, Callable[[bytes], Metadata]] = {1: _decode_v1}
"""One decoder per format version this torchstow reads."""


def decode_metadata(data: bytes, *, source: str = "manifest") -> Metadata:
    """Parse a manifest of any version in :data:`DECODERS`. Never unpickles."""
    try:
        header = msgspec.json.decode(data, type=_Header)
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
        return decoder(data)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc}") from exc
    except (msgspec.DecodeError, IndexError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc}") from exc
