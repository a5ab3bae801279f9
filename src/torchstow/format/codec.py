"""The manifest's JSON codec: one encoder (the current version) and a decoder per
format version, so a newer version can be added without breaking older readers.

Decoding goes straight into the typed structs of :mod:`torchstow.format.schema`
(:mod:`msgspec`): a field of the wrong
type, a missing one, or a value out of place is a :class:`CorruptCheckpointError`
naming where it is; a newer version than this torchstow knows is a
:class:`FormatVersionError`. Nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

import msgspec

from torchstow.errors import CorruptCheckpointError, FormatVersionError
from torchstow.format.bulk import chunked_entries_ok
from torchstow.format.checksums import ALGORITHM, check_algorithm
from torchstow.format.decoded import build_metadata
from torchstow.format.manifest import (
    FORMAT_VERSION,
    STORAGE_TYPES,
    BytesStorageMetadata,
    Metadata,
    StorageInfo,
    dtype_name,
)
from torchstow.format.schema import (
    Checksum,
    Chunk,
    Document,
    Entry,
    Header,
    PlainDocument,
    PlainEntry,
    RangedDocument,
)
from torchstow.format.validation import check_manifest

FORMAT_NAME = "torchstow"

__all__ = ["DECODERS", "FORMAT_NAME", "FORMAT_VERSION", "decode_metadata", "encode_metadata"]


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
    if not isinstance(storage_data, dict):
        return False
    kinds = {*map(type, storage_data.values())}
    return kinds <= {StorageInfo} or all(isinstance(info, StorageInfo) for info in storage_data.values())


def encode_metadata(md: Metadata) -> bytes:
    """Serialize a manifest to UTF-8 JSON in the current format version.

    Locations recorded as :class:`StorageInfo` are written into the entry
    they belong to; any other ``storage_data`` must itself be JSON. A tensor
    stored as one whole chunk keeps its location on the entry itself.
    """
    inline = _is_locations(md.storage_data)
    block_size = 0
    if inline:
        block_size = next((info.block_size for info in md.storage_data.values() if info.block_size), 0)
    locations = _Locations(block_size)
    by_fqn = _encode_locations(md.storage_data, locations) if inline else {}
    no_locations: dict[Any, Chunk] = {}
    entries = {
        fqn: _encode_entry(entry, by_fqn.get(fqn, no_locations))
        for fqn, entry in md.state_dict_metadata.items()
    }
    doc = Document(
        format=FORMAT_NAME,
        version=md.version,
        torch_version=str(md.torch_version),
        committed_at=md.committed_at,
        user_metadata=md.user_metadata,
        checksum=Checksum(ALGORITHM, block_size),
        files=locations.files,
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


class _RawEntriesV1(msgspec.Struct):
    """Only the entries, each kept raw: decoded one by one, a type error names its key."""

    entries: dict[str, msgspec.Raw] = {}


_entry_decoder = msgspec.json.Decoder(PlainEntry)


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


DECODERS: dict[int, Callable[[bytes], Metadata]] = {1: _decode_v1}
"""One decoder per format version this torchstow reads."""


def decode_metadata(data: bytes, *, source: str = "manifest") -> Metadata:
    """Parse a manifest of any version in :data:`DECODERS`. Never unpickles."""
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
        return decoder(data)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc}") from exc
    except (msgspec.DecodeError, IndexError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc}") from exc
