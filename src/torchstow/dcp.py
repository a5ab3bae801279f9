"""A drop-in for ``torch.distributed.checkpoint``: ``import torchstow.dcp as dcp``.

The names a DCP program uses, with torchstow doing the storage: :func:`save`,
:func:`load` and :func:`async_save` take DCP's keywords and write and read
torchstow checkpoints (any backend, plugins included; DCP-format checkpoints are
read too); :class:`FileSystemWriter`/:class:`FileSystemReader` take DCP's
constructor arguments and accept any URI. The planners, plans, metadata
classes, storage ABCs, ``Stateful`` and ``AsyncCheckpointerType`` are DCP's own
classes, so a program's planner subclasses and ``isinstance`` checks keep
working; ``save`` returns DCP's ``Metadata``.

Differences, documented in docs/dcp.md: a writer or reader that is not
torchstow's (a DCP program's own storage class) is handed to DCP's own
``save``/``load`` unchanged; ``async_save`` returns a :class:`torchstow.AsyncSave`
(a future: ``result()``, ``done()``); the deprecated ``save_state_dict``/
``load_state_dict`` and the Hugging Face storage classes are not mirrored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch.distributed.checkpoint as _dcp
from torch.distributed.checkpoint import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    DefaultLoadPlanner,
    DefaultSavePlanner,
    LoadPlan,
    LoadPlanner,
    Metadata,
    ReadItem,
    SavePlan,
    SavePlanner,
    StorageReader,
    StorageWriter,
    TensorStorageMetadata,
    WriteItem,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

from torchstow import api
from torchstow.compat.dcp_types import dcp_metadata
from torchstow.errors import CheckpointException
from torchstow.interop.dcp_storage import DcpStorageReader, DcpStorageWriter
from torchstow.plugins.manager import accepted_storage_options, default_registry

__all__ = [
    "AsyncCheckpointerType",
    "BytesStorageMetadata",
    "CheckpointException",
    "ChunkStorageMetadata",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "FileSystemReader",
    "FileSystemWriter",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
    "Stateful",
    "StorageReader",
    "StorageWriter",
    "TensorStorageMetadata",
    "WriteItem",
    "async_save",
    "load",
    "save",
]

Path = str | os.PathLike[str]


def _options(path: str, storage_options: dict[str, Any] | None, **dcp_options: Any) -> dict[str, Any]:
    """``storage_options`` plus those of DCP's arguments the backend of ``path`` takes."""
    backend = default_registry().resolve(path).backend
    accepted = accepted_storage_options(backend, path)
    mapped = {k: v for k, v in dcp_options.items() if v is not None and (accepted is None or k in accepted)}
    return {**mapped, **(storage_options or {})}


class FileSystemWriter(DcpStorageWriter):
    """DCP's ``FileSystemWriter``, writing a torchstow checkpoint at ``path`` (any URI).

    ``thread_count`` sets the backend's writer threads (and data files per
    rank; None, the default here, leaves the backend's own default) and
    ``sync_files`` its ``fsync`` where the backend has one;
    ``overwrite`` (default True, as in DCP) replaces a committed checkpoint.
    ``single_file_per_rank``, ``per_thread_copy_ahead`` and
    ``cache_staged_state_dict`` are accepted and ignored (torchstow's layout
    and stagers decide); stream extensions and a serialization format other
    than DCP's default are refused. ``storage_options`` are torchstow's, for
    the backend.
    """

    def __init__(
        self,
        path: Path,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int | None = None,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: Any = None,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if _extensions:
            raise ValueError("torchstow.dcp.FileSystemWriter takes no stream extensions (_extensions)")
        if serialization_format is not None and getattr(serialization_format, "value", None) != "torch_save":
            raise ValueError(
                f"torchstow.dcp.FileSystemWriter writes torchstow's format, not {serialization_format!r}"
            )
        text = os.fspath(path)
        self.overwrite = overwrite
        self.storage_options = _options(text, storage_options, thread_count=thread_count, fsync=sync_files)
        super().__init__(self._open(text), text)

    def _open(self, path: str) -> Any:
        return api.storage_writer(path, storage_options=self.storage_options, overwrite=self.overwrite)

    def reset(self, checkpoint_id: Path | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.uri:
            self.uri = os.fspath(checkpoint_id)
            self.torchstow_writer = self._open(self.uri)
        super().reset(None)


class FileSystemReader(DcpStorageReader):
    """DCP's ``FileSystemReader``, reading the checkpoint at ``path`` (any URI; torchstow's
    format or DCP's). ``storage_options`` are torchstow's, for the backend; objects saved
    with full pickle need ``allow_pickle=True``."""

    def __init__(
        self,
        path: Path,
        _extension_registry: Any = None,
        *,
        storage_options: dict[str, Any] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        text = os.fspath(path)
        self.storage_options = storage_options
        super().__init__(self._open(text), text, allow_pickle=allow_pickle)

    def _open(self, path: str) -> Any:
        return api.storage_reader(path, storage_options=self.storage_options)

    def reset(self, checkpoint_id: Path | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.uri:
            self.uri = os.fspath(checkpoint_id)
            self.torchstow_reader = self._open(self.uri)
        super().reset(None)


def _foreign(storage: Any, kind: str) -> bool:
    """A DCP storage object of the program's own (not one backed by torchstow, nor a
    torchstow writer or reader, which torchstow's calls take as they are)."""
    base = _dcp.StorageWriter if kind == "writer" else _dcp.StorageReader
    return isinstance(storage, base) and not hasattr(storage, f"torchstow_{kind}")


def _named(storage: Any, checkpoint_id: Path | None) -> tuple[Path | None, Any]:
    """DCP's rule: with both a checkpoint id and a storage object, the id resets the object."""
    if storage is not None and checkpoint_id is not None:
        storage.reset(checkpoint_id)
        return None, storage
    return checkpoint_id, storage


def save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: Path | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> Metadata:
    """``torch.distributed.checkpoint.save``: a torchstow checkpoint at ``checkpoint_id``
    (or through ``storage_writer``); returns DCP's ``Metadata`` of what was committed."""
    common: dict[str, Any] = dict(
        planner=planner, process_group=process_group, no_dist=no_dist, use_collectives=use_collectives
    )
    if _foreign(storage_writer, "writer"):
        return _dcp.save(state_dict, checkpoint_id=checkpoint_id, storage_writer=storage_writer, **common)
    checkpoint_id, writer = _named(storage_writer, checkpoint_id)
    return dcp_metadata(api.save(state_dict, checkpoint_id=checkpoint_id, storage_writer=writer, **common))


def load(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: Path | None = None,
    storage_reader: StorageReader | None = None,
    planner: LoadPlanner | None = None,
    process_group: Any = None,
    no_dist: bool = False,
) -> None:
    """``torch.distributed.checkpoint.load``: fills ``state_dict`` in place from the
    checkpoint at ``checkpoint_id`` (or through ``storage_reader``)."""
    common: dict[str, Any] = dict(planner=planner, process_group=process_group, no_dist=no_dist)
    if _foreign(storage_reader, "reader"):
        _dcp.load(state_dict, checkpoint_id=checkpoint_id, storage_reader=storage_reader, **common)
        return
    checkpoint_id, reader = _named(storage_reader, checkpoint_id)
    api.load(state_dict, checkpoint_id=checkpoint_id, storage_reader=reader, **common)


def async_save(
    state_dict: dict[str, Any],
    *,
    checkpoint_id: Path | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: Any = None,
    async_checkpointer_type: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
    async_stager: Any = None,
    no_dist: bool = False,
    use_collectives: bool = True,
) -> Any:
    """``torch.distributed.checkpoint.async_save``: returns once the state dict is staged;
    the returned :class:`torchstow.AsyncSave` is a future of the commit (a writer of the
    program's own goes to DCP's ``async_save``, which returns what DCP returns)."""
    common: dict[str, Any] = dict(
        planner=planner,
        process_group=process_group,
        async_checkpointer_type=async_checkpointer_type,
        async_stager=async_stager,
        no_dist=no_dist,
        use_collectives=use_collectives,
    )
    if _foreign(storage_writer, "writer"):
        return _dcp.async_save(
            state_dict, checkpoint_id=checkpoint_id, storage_writer=storage_writer, **common
        )
    checkpoint_id, writer = _named(storage_writer, checkpoint_id)
    return api.async_save(state_dict, checkpoint_id=checkpoint_id, storage_writer=writer, **common)
