"""The checkpoint manifest: dataclasses and their JSON codec.

The manifest is plain JSON (no pickle anywhere): a format name and version,
the user metadata, and one entry per fully-qualified key. A tensor entry holds
its dtype, global shape and chunks, each chunk with the location of its bytes
(file, byte offset, length, crc32c per checksum block). A non-tensor entry holds
its value inline when it is JSON, else the location of its serialized bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from torchstow.errors import CorruptCheckpointError, FormatVersionError

FORMAT_NAME = "torchstow"
FORMAT_VERSION = 1

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BytesStorageMetadata",
    "CheckpointInfo",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageInfo",
    "TensorProperties",
    "TensorStorageMetadata",
    "decode_metadata",
    "dtype_from_name",
    "dtype_name",
    "encode_metadata",
]


@dataclass(frozen=True)
class ChunkStorageMetadata:
    """One stored chunk of a tensor: where it sits in the global tensor."""

    offsets: torch.Size
    sizes: torch.Size


@dataclass(frozen=True)
class TensorProperties:
    """What it takes to recreate a tensor besides its shape."""

    dtype: torch.dtype
    requires_grad: bool = False


@dataclass
class TensorStorageMetadata:
    """A tensor entry: dtype, global shape and the stored chunks."""

    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    """A non-tensor entry.

    ``encoding`` is ``"json"`` (the value is ``value``, inline in the manifest),
    ``"torch"`` (bytes read back with ``torch.load(weights_only=True)``) or
    ``"pickle"`` (bytes that need full unpickling, gated by ``allow_pickle``).
    """

    encoding: str = "torch"
    value: Any = None


STORAGE_TYPES = Union[TensorStorageMetadata, BytesStorageMetadata]  # noqa: UP007


class MetadataIndex:
    """Names one stored item: a key, and for a tensor chunk its offsets.

    ``index`` is only a lookup hint (the chunk's position in its entry) and
    takes no part in equality or hashing.
    """

    __slots__ = ("_hash", "fqn", "index", "offset")

    def __init__(self, fqn: str, offset: Sequence[int] | None = None, index: int | None = None):
        self.fqn = fqn
        self.offset = offset if offset is None or type(offset) is torch.Size else torch.Size(offset)
        self.index = index
        self._hash = hash((fqn, self.offset))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MetadataIndex):
            return NotImplemented
        return self.fqn == other.fqn and self.offset == other.offset

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        if self.offset is None:
            return f"MetadataIndex({self.fqn!r})"
        return f"MetadataIndex({self.fqn!r}, offset={tuple(self.offset)})"

    def __getstate__(self) -> tuple[str, torch.Size | None, int | None]:
        return (self.fqn, self.offset, self.index)

    def __setstate__(self, state: tuple[str, torch.Size | None, int | None]) -> None:
        self.fqn, self.offset, self.index = state
        self._hash = hash((self.fqn, self.offset))


@dataclass(frozen=True)
class StorageInfo:
    """Where one item's bytes live and how to verify them.

    ``checksums`` holds one crc32c per ``block_size`` bytes of the item (the
    last block may be shorter); an empty item has no checksums.
    """

    relative_path: str
    offset: int
    length: int
    checksums: tuple[int, ...] = ()
    block_size: int = 0


@dataclass
class Metadata:
    """The manifest of one checkpoint."""

    state_dict_metadata: dict[str, STORAGE_TYPES]
    planner_data: Any = None
    storage_data: Any = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    committed_at: float | None = None
    torch_version: str = torch.__version__


@dataclass(frozen=True)
class CheckpointInfo:
    """A summary of one committed checkpoint, read from its manifest alone."""

    uri: str
    step: int | None
    committed_at: float | None
    nbytes: int
    num_entries: int
    user_metadata: dict[str, Any]
    format_version: int


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest spelling of a dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; a clear error for dtypes this torch lacks."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(
            f"the manifest names dtype {name!r}, which torch {torch.__version__} does not have"
        )
    return dtype


class _Locations:
    """Writes and reads chunk locations compactly: file names become indices
    into the manifest's ``files`` list, and the checksum block size is stated
    once unless a location differs."""

    def __init__(self, files: list[str] | None = None, block_size: int = 0) -> None:
        self.files = files if files is not None else []
        self._file_ids = {name: i for i, name in enumerate(self.files)}
        self.block_size = block_size

    def to_json(self, info: StorageInfo, out: dict[str, Any]) -> None:
        file_id = self._file_ids.get(info.relative_path)
        if file_id is None:
            file_id = self._file_ids[info.relative_path] = len(self.files)
            self.files.append(info.relative_path)
        out["file"] = file_id
        out["offset"] = info.offset
        out["length"] = info.length
        out["crc32c"] = info.checksums
        if info.block_size != self.block_size:
            out["block"] = info.block_size

    def from_json(self, raw: dict[str, Any]) -> StorageInfo:
        return StorageInfo(
            self.files[raw["file"]],
            raw["offset"],
            raw["length"],
            tuple(raw["crc32c"]),
            raw.get("block", self.block_size),
        )


def _inline_locations(md: Metadata) -> bool:
    data = md.storage_data
    return isinstance(data, dict) and all(isinstance(v, StorageInfo) for v in data.values())


def encode_metadata(md: Metadata) -> bytes:
    """Serialize a manifest to UTF-8 JSON.

    Locations recorded as :class:`StorageInfo` are written into the entry
    they belong to; any other ``storage_data`` must itself be JSON. A tensor
    stored as one whole chunk keeps its location on the entry itself.
    """
    inline = _inline_locations(md)
    by_fqn: dict[str, dict[Any, StorageInfo]] = {}
    block_size = 0
    if inline:
        for index, info in md.storage_data.items():
            by_fqn.setdefault(index.fqn, {})[index.offset] = info
            block_size = block_size or info.block_size
    locations = _Locations(block_size=block_size)
    entries: dict[str, Any] = {}
    for fqn, entry in md.state_dict_metadata.items():
        locs = by_fqn.get(fqn, {})
        if isinstance(entry, TensorStorageMetadata):
            raw: dict[str, Any] = {"dtype": dtype_name(entry.properties.dtype), "shape": list(entry.size)}
            if entry.properties.requires_grad:
                raw["requires_grad"] = True
            chunks = entry.chunks
            if len(chunks) == 1 and chunks[0].sizes == entry.size and not any(chunks[0].offsets):
                loc = locs.get(chunks[0].offsets)
                if loc is not None:
                    locations.to_json(loc, raw)
            else:
                raw_chunks = []
                for chunk in chunks:
                    raw_chunk: dict[str, Any] = {"offsets": list(chunk.offsets), "sizes": list(chunk.sizes)}
                    loc = locs.get(chunk.offsets)
                    if loc is not None:
                        locations.to_json(loc, raw_chunk)
                    raw_chunks.append(raw_chunk)
                raw["chunks"] = raw_chunks
        else:
            raw = {"encoding": entry.encoding}
            if entry.encoding == "json":
                raw["value"] = entry.value
            loc = locs.get(None)
            if loc is not None:
                locations.to_json(loc, raw)
        entries[fqn] = raw
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": md.version,
        "torch_version": md.torch_version,
        "committed_at": md.committed_at,
        "user_metadata": md.user_metadata,
        "checksum": {"algorithm": "crc32c", "block_size": block_size},
        "files": locations.files,
        "planner_data": md.planner_data,
        "entries": entries,
    }
    if not inline and md.storage_data is not None:
        doc["storage_data"] = md.storage_data
    try:
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the checkpoint manifest is not JSON-serializable: {exc}") from exc


def decode_metadata(data: bytes, *, source: str = "manifest") -> Metadata:
    """Parse a manifest written by :func:`encode_metadata`. Never unpickles."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{source} is not a torchstow manifest")
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{source} has format version {version!r}; this torchstow reads versions up to "
            f"{FORMAT_VERSION}: upgrade torchstow to read it"
        )
    try:
        return _decode_entries(doc)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{source} is malformed: {exc!r}") from exc


def _decode_entries(doc: dict[str, Any]) -> Metadata:
    entries: dict[str, STORAGE_TYPES] = {}
    found: dict[MetadataIndex, StorageInfo] = {}
    locations = _Locations(doc.get("files", []), doc.get("checksum", {}).get("block_size", 0))
    props_cache: dict[tuple[str, bool], TensorProperties] = {}
    for fqn, raw in doc["entries"].items():
        dtype = raw.get("dtype")
        if dtype is not None:
            key = (dtype, raw.get("requires_grad", False))
            props = props_cache.get(key)
            if props is None:
                props = props_cache[key] = TensorProperties(dtype_from_name(dtype), key[1])
            size = torch.Size(raw["shape"])
            raw_chunks = raw.get("chunks")
            if raw_chunks is None:
                chunk = ChunkStorageMetadata(torch.Size((0,) * len(size)), size)
                entries[fqn] = TensorStorageMetadata(props, size, [chunk])
                if "file" in raw:
                    found[MetadataIndex(fqn, chunk.offsets, 0)] = locations.from_json(raw)
                continue
            chunks = []
            for i, rc in enumerate(raw_chunks):
                chunk = ChunkStorageMetadata(torch.Size(rc["offsets"]), torch.Size(rc["sizes"]))
                chunks.append(chunk)
                if "file" in rc:
                    found[MetadataIndex(fqn, chunk.offsets, i)] = locations.from_json(rc)
            entries[fqn] = TensorStorageMetadata(props, size, chunks)
        else:
            entries[fqn] = BytesStorageMetadata(raw["encoding"], raw.get("value"))
            if "file" in raw:
                found[MetadataIndex(fqn)] = locations.from_json(raw)
    storage_data: Any = found if found else doc.get("storage_data")
    return Metadata(
        state_dict_metadata=entries,
        planner_data=doc.get("planner_data"),
        storage_data=storage_data,
        user_metadata=doc.get("user_metadata") or {},
        version=doc["version"],
        committed_at=doc.get("committed_at"),
        torch_version=doc.get("torch_version", ""),
    )


def stored_nbytes(md: Metadata) -> int:
    """Bytes of data the checkpoint's items occupy in storage."""
    if _inline_locations(md):
        return sum(info.length for info in md.storage_data.values())
    total = 0
    for entry in md.state_dict_metadata.values():
        if isinstance(entry, TensorStorageMetadata):
            itemsize = entry.properties.dtype.itemsize
            total += sum(math.prod(c.sizes) * itemsize for c in entry.chunks)
    return total
