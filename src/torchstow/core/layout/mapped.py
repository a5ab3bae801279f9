"""Zero-copy reads: tensors that map a checkpoint's data files.

The layout aligns every item (64 bytes, 4 KiB for large ones), so a tensor
stored as one chunk can be a view straight into its mapped data file: no
bytes are copied or even read until they are used. Files are mapped
privately (``MAP_PRIVATE``): writing to such a tensor copies the touched
pages on write, for this process alone; the files never change. A tensor
stored in several chunks (sharded over ranks) is assembled into new memory
from its mapped chunks.

With ``verify`` every mapped byte is checked against its block checksums
(which reads it once); without it, mapping costs the same whatever the size,
and a corrupted byte goes unnoticed.

A compressed tensor (a chunk saved with ``compression=``) cannot be a view of
its file: it is left out here, and ``read(mmap=True)`` reads and decompresses
it into memory like any copied read.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import torch

from torchstow.core.layout.read_plan import checksum_mismatch
from torchstow.core.layout.views import tensor_bytes
from torchstow.core.storage.store import ByteStore
from torchstow.errors import CorruptCheckpointError
from torchstow.format.checksums import BlockVerifier, block_bytes
from torchstow.format.chunks import region
from torchstow.format.files import MANIFEST
from torchstow.format.manifest import (
    EncodedLocations,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorStorageMetadata,
)

__all__ = ["map_checkpoint", "map_tensors"]


class _Files:
    """The mapped data files of one checkpoint, each mapped once."""

    def __init__(self, store: ByteStore) -> None:
        self.store = store
        self.maps: dict[str, tuple[Any, int]] = {}

    def storage(self, name: str) -> tuple[Any, int]:
        """The file mapped (None when empty) and its size."""
        found = self.maps.get(name)
        if found is None:
            path = self.store.local_path(name)
            if path is None:
                raise ValueError(f"{self.store.location}: this store has no local files to map")
            try:
                status = os.lstat(path)  # a link is not followed out of the checkpoint
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(
                    f"{self.store.location}/{name} is missing, though the committed manifest lists it"
                ) from exc
            if not stat.S_ISREG(status.st_mode):
                raise CorruptCheckpointError(
                    f"{self.store.location}/{name} is not a regular file (a link, FIFO or device); "
                    "a checkpoint holds regular files"
                )
            size = status.st_size
            # shared=False: a private, copy-on-write mapping of a file opened read-only
            storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size) if size else None
            found = self.maps[name] = (storage, size)
        return found


def _view(
    files: _Files, fqn: str, info: StorageInfo, dtype: torch.dtype, shape: torch.Size, verify: bool
) -> torch.Tensor:
    """The stored chunk ``info`` as a tensor over its mapped file."""
    expected = shape.numel() * dtype.itemsize
    if info.length != expected:
        raise CorruptCheckpointError(
            f"{files.store.location}: {fqn!r} has {info.length} bytes recorded, its shape needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    storage, size = files.storage(info.relative_path)
    if info.offset + info.length > size:
        raise CorruptCheckpointError(
            f"{files.store.location}/{info.relative_path} is truncated: {fqn!r} needs bytes "
            f"{info.offset}..{info.offset + info.length}, the file has {size}"
        )
    if info.offset % dtype.itemsize:
        raise CorruptCheckpointError(f"{files.store.location}: {fqn!r} is not aligned for {dtype}")
    tensor = torch.empty(0, dtype=dtype).set_(storage, info.offset // dtype.itemsize, shape)  # type: ignore[call-overload]
    if verify:
        verifier = BlockVerifier(0, info.checksums, block_bytes(info.block_size, info.length))
        bad = verifier.feed(tensor_bytes(tensor))
        bad = verifier.end() if bad is None else bad
        if bad is not None:
            raise checksum_mismatch(fqn, files.store.location, info, bad)
    return tensor


def map_tensors(
    store: ByteStore, metadata: Metadata, fqns: list[str], *, verify: bool = True
) -> dict[str, Any]:
    """The tensors ``fqns`` of the checkpoint in ``store``, over its mapped data files,
    except the compressed ones (left out: the caller reads them).

    Raises ChecksumMismatchError (``verify``) or CorruptCheckpointError when
    the files do not hold what the manifest says.
    """
    locations: dict[MetadataIndex, StorageInfo] = metadata.storage_data or {}
    files = _Files(store)
    out: dict[str, Any] = {}
    for fqn in fqns:
        entry = metadata.state_dict_metadata[fqn]
        assert isinstance(entry, TensorStorageMetadata)
        dtype = entry.properties.dtype
        whole = None
        parts = []
        infos = [locations.get(MetadataIndex(fqn, chunk.offsets, i)) for i, chunk in enumerate(entry.chunks)]
        if any(info is not None and info.codec is not None for info in infos):
            continue  # compressed: decompressed into memory by the caller's read
        for chunk, info in zip(entry.chunks, infos, strict=True):
            if info is None:
                raise CorruptCheckpointError(f"the manifest at {store.location} has no data for {fqn!r}")
            view = _view(files, fqn, info, dtype, chunk.sizes, verify)
            if chunk.sizes == entry.size:
                whole = view
            parts.append((chunk, view))
        if whole is None:
            whole = torch.empty(entry.size, dtype=dtype)
            for chunk, view in parts:
                region(whole, chunk.offsets, chunk.sizes).copy_(view)
        out[fqn] = whole
    return out


def map_checkpoint(
    store: ByteStore | None, uri: str, metadata: Metadata, fqns: list[str], *, verify: bool = True
) -> dict[str, Any]:
    """The tensors among ``fqns`` of the checkpoint at ``uri`` (in ``store``; None for a
    backend that is no byte store), mapped (see :func:`map_tensors`).

    Raises ValueError for a store whose files are not local (only local
    files and ``shm://`` can be mapped). A checkpoint whose items are encoded
    (DCP's format) maps nothing: the caller reads every tensor as usual.
    """
    if isinstance(metadata.storage_data, EncodedLocations):
        return {}
    if store is None or store.local_path(MANIFEST) is None:
        raise ValueError(
            f"read(mmap=True) maps local files: {uri!r} is not on a local filesystem or shm://; "
            "read it without mmap=True"
        )
    tensors = [f for f in fqns if isinstance(metadata.state_dict_metadata[f], TensorStorageMetadata)]
    return map_tensors(store, metadata, tensors, verify=verify)
