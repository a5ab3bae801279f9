"""The checkpoint manifest's dataclasses (its JSON codec is :mod:`torchstow.format.codec`).

The manifest is plain JSON (no pickle anywhere): a format name and version,
the user metadata, and one entry per fully-qualified key. A tensor entry holds
its dtype, global shape and chunks, each chunk with the location of its bytes
(file, byte offset, length, crc32c per checksum block). A non-tensor entry holds
its value inline when it is JSON, else the location of its serialized bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from torchstow.errors import CorruptCheckpointError

FORMAT_VERSION = 2
"""The format version this torchstow writes by default (the codec reads older ones too,
and writes version 1 for ``save(..., format_version=1)``)."""

__all__ = [
    "FORMAT_VERSION",
    "BytesStorageMetadata",
    "CheckpointInfo",
    "ChunkStorageMetadata",
    "EncodedLocations",
    "Metadata",
    "MetadataIndex",
    "StorageInfo",
    "TensorProperties",
    "TensorStorageMetadata",
    "dtype_from_name",
    "dtype_name",
    "inline_locations",
    "located_files",
    "new_storage_info",
    "stored_nbytes",
]

_new = object.__new__
_set = object.__setattr__


class EncodedLocations(dict):
    """The ``storage_data`` of a checkpoint in another format whose items are encoded
    (DCP stores each chunk as a ``torch.save`` blob), not raw bytes at aligned offsets:
    they are read and decoded, never mapped."""


@dataclass(frozen=True)
class ChunkStorageMetadata:
    """One stored chunk of a tensor: where it sits in the global tensor."""

    offsets: torch.Size
    sizes: torch.Size


@dataclass(frozen=True)
class TensorProperties:
    """What it takes to recreate a tensor besides its shape.

    ``layout``, ``memory_format`` and ``pin_memory`` are kept for DCP's
    sake (its planners read them); the manifest stores dtype and requires_grad.
    """

    dtype: torch.dtype
    requires_grad: bool = False
    layout: torch.layout = torch.strided
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False

    @staticmethod
    def create_from_tensor(tensor: torch.Tensor) -> TensorProperties:
        """The properties of ``tensor``, as DCP's ``TensorProperties.create_from_tensor`` gives them."""
        return TensorProperties(
            dtype=tensor.dtype,
            requires_grad=tensor.requires_grad,
            layout=tensor.layout,
            memory_format=torch.contiguous_format,
            pin_memory=tensor.is_pinned() if tensor.device.type == "cpu" else False,
        )


@dataclass
class TensorStorageMetadata:
    """A tensor entry: dtype, global shape and the stored chunks."""

    properties: TensorProperties
    size: torch.Size
    chunks: Sequence[ChunkStorageMetadata]  # a list, or a version-2 manifest's lazy view


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

    @classmethod
    def of_chunk(cls, fqn: str, offset: torch.Size, index: int) -> MetadataIndex:
        """``MetadataIndex(fqn, offset, index)`` for an ``offset`` that is already a
        ``torch.Size``, made faster (a decoder makes one per stored chunk)."""
        made = _new(cls)
        made.fqn, made.offset, made.index = fqn, offset, index
        made._hash = hash((fqn, offset))
        return made

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
    ``content_hash`` is the BLAKE3 digest (hex) of the item's bytes, recorded
    by incremental saves (None when the save did not hash). ``codec`` names how the
    stored bytes are compressed (:data:`~torchstow.format.compression.CODECS`), None
    when they are the item's raw bytes; ``length``, the checksums and the digest are
    then those of the stored (compressed) bytes.
    """

    relative_path: str
    offset: int
    length: int
    checksums: tuple[int, ...] = ()
    block_size: int = 0
    content_hash: str | None = None
    codec: str | None = None


def new_storage_info(
    relative_path: str,
    offset: int,
    length: int,
    checksums: tuple[int, ...],
    block_size: int,
    content_hash: str | None,
    codec: str | None = None,
) -> StorageInfo:
    """``StorageInfo(...)`` in half the time, for a decoder making one per stored chunk:
    the frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    this sets its ``__dict__`` at once."""
    info = _new(StorageInfo)
    _set(
        info,
        "__dict__",
        {
            "relative_path": relative_path,
            "offset": offset,
            "length": length,
            "checksums": checksums,
            "block_size": block_size,
            "content_hash": content_hash,
            "codec": codec,
        },
    )
    return info


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
    #: Bytes of data files this save wrote (None: not recorded; then every stored byte was).
    nbytes_written: int | None = None
    save_id: str | None = None  # unique to the save that wrote it (how a writer recognizes its commit)
    #: Seconds the save took until its commit, on the coordinator (None: not recorded).
    save_seconds: float | None = None


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
    #: Bytes the save wrote; less than ``nbytes`` for an incremental save.
    nbytes_written: int = 0
    #: Seconds the save took until its commit (None: not recorded, as by DCP or older torchstow).
    save_seconds: float | None = None


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


def inline_locations(md: Metadata) -> bool:
    """Whether ``md.storage_data`` maps items to :class:`StorageInfo` (the layout's locations:
    a dict, or a version-2 manifest's columns)."""
    data = md.storage_data
    if hasattr(data, "total_length"):  # format.table.TableLocations: columns of StorageInfo
        return True
    return isinstance(data, dict) and all(isinstance(v, StorageInfo) for v in data.values())


def located_files(md: Metadata) -> set[str]:
    """The data files ``md``'s locations name (none where ``storage_data`` holds none)."""
    data = md.storage_data
    if hasattr(data, "file_names"):  # columns: no object per item
        return set(data.file_names())
    if not isinstance(data, Mapping):
        return set()
    return {info.relative_path for info in data.values() if isinstance(info, StorageInfo)}


def stored_nbytes(md: Metadata) -> int:
    """Bytes of data the checkpoint's items occupy in storage."""
    if hasattr(md.storage_data, "total_length"):
        return int(md.storage_data.total_length())
    if inline_locations(md):
        return sum(info.length for info in md.storage_data.values())
    total = 0
    for entry in md.state_dict_metadata.values():
        if isinstance(entry, TensorStorageMetadata):
            itemsize = entry.properties.dtype.itemsize
            total += sum(math.prod(c.sizes) * itemsize for c in entry.chunks)
    return total
