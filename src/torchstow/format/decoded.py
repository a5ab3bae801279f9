"""A validated version-1 manifest document made into :class:`Metadata` objects.

The codec (:mod:`torchstow.format.codec`) decodes and validates; this builds the
objects every reader uses: a :class:`TensorStorageMetadata` per tensor, and in
``storage_data`` a :class:`StorageInfo` per stored item keyed by its
:class:`MetadataIndex`. A manifest holds one location per chunk, so the loop
over a tensor's chunks is kept to two object constructions and a dict insert;
chunk geometry (offsets and sizes) is shared by every tensor chunked alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import torch

from torchstow.errors import CorruptCheckpointError
from torchstow.format.manifest import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
    dtype_from_name,
    new_storage_info,
)

__all__ = ["build_metadata", "document_metadata"]

Found = dict[MetadataIndex, StorageInfo]


def _location(raw: Any, files: list[str], block_size: int) -> StorageInfo:
    if raw.file is None or raw.offset is None or raw.length is None or raw.crc32c is None:
        raise CorruptCheckpointError("a location needs file, offset, length and crc32c")
    return new_storage_info(
        files[raw.file],
        raw.offset,
        raw.length,
        tuple(raw.crc32c),
        block_size if raw.block is None else raw.block,
        raw.blake3,
        raw.codec,
    )


def _add_checked(
    fqn: str, chunks: list[ChunkStorageMetadata], raw: Any, files: list[str], block_size: int, found: Found
) -> None:
    """The locations of chunks the bulk check passed: each complete, in ``block_size``."""
    index = MetadataIndex.of_chunk
    for i, (chunk, rc) in enumerate(zip(chunks, raw.chunks, strict=True)):
        found[index(fqn, chunk.offsets, i)] = new_storage_info(
            files[rc.file], rc.offset, rc.length, rc.crc32c, block_size, rc.blake3, rc.codec
        )


def _chunks_one_by_one(
    fqn: str,
    raw: Any,
    files: list[str],
    block_size: int,
    found: Found,
    layouts: dict[tuple[Any, ...], list[ChunkStorageMetadata]],
) -> list[ChunkStorageMetadata]:
    """A tensor's chunks (some without a location, or with a block size of their own)."""
    key = (tuple(tuple(c.offsets) for c in raw.chunks), tuple(tuple(c.sizes) for c in raw.chunks))
    chunks = layouts.get(key)
    if chunks is None:
        chunks = layouts[key] = [
            ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            for offsets, sizes in zip(key[0], key[1], strict=True)
        ]
    for i, (chunk, rc) in enumerate(zip(chunks, raw.chunks, strict=True)):
        if rc.file is not None:
            found[MetadataIndex.of_chunk(fqn, chunk.offsets, i)] = _location(rc, files, block_size)
    return list(chunks)


def build_metadata(doc: Any, checked: Mapping[str, list[ChunkStorageMetadata]]) -> Metadata:
    """The :class:`Metadata` of a validated version-1 document; ``checked`` maps the
    tensors the bulk check passed to their chunk objects."""
    files, block_size = doc.files, doc.checksum.block_size
    entries: dict[str, STORAGE_TYPES] = {}
    found: Found = {}
    props_cache: dict[tuple[str, bool], TensorProperties] = {}
    layouts: dict[tuple[Any, ...], list[ChunkStorageMetadata]] = {}
    for fqn, raw in doc.entries.items():
        if raw.dtype is None:
            if raw.encoding is None:
                raise CorruptCheckpointError(f"the entry {fqn!r} has neither a dtype nor an encoding")
            entries[fqn] = BytesStorageMetadata(raw.encoding, raw.value)
            if raw.file is not None:
                found[MetadataIndex(fqn)] = _location(raw, files, block_size)
            continue
        props = props_cache.get((raw.dtype, raw.requires_grad))
        if props is None:
            props = props_cache[raw.dtype, raw.requires_grad] = TensorProperties(
                dtype_from_name(raw.dtype), raw.requires_grad
            )
        if raw.shape is None:
            raise CorruptCheckpointError(f"the tensor entry {fqn!r} has no shape")
        size = torch.Size(raw.shape)
        shared = checked.get(fqn)
        if shared is not None:
            _add_checked(fqn, shared, raw, files, block_size, found)
            chunks = list(shared)
        elif raw.chunks is not None:
            chunks = _chunks_one_by_one(fqn, raw, files, block_size, found, layouts)
        else:
            chunks = [ChunkStorageMetadata(torch.Size((0,) * len(size)), size)]
            if raw.file is not None:
                found[MetadataIndex.of_chunk(fqn, chunks[0].offsets, 0)] = _location(raw, files, block_size)
        entries[fqn] = TensorStorageMetadata(props, size, chunks)
    return document_metadata(doc, entries, found)


def document_metadata(doc: Any, entries: dict[str, STORAGE_TYPES], located: Mapping[Any, Any]) -> Metadata:
    """The :class:`Metadata` of a decoded manifest document (any version) with its
    ``entries``: its locations are ``located`` when there are any, else the
    document's own ``storage_data`` (another writer's, kept as it was)."""
    storage_data = doc.storage_data if doc.storage_data is not msgspec.UNSET else None
    return Metadata(
        state_dict_metadata=entries,
        planner_data=doc.planner_data,
        storage_data=located if located else storage_data,
        user_metadata=doc.user_metadata or {},
        version=doc.version,
        committed_at=doc.committed_at,
        torch_version=doc.torch_version,
        nbytes_written=doc.nbytes_written,
        save_id=doc.save_id,
        save_seconds=doc.save_seconds,
    )
