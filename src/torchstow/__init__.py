"""torchstow: pluggable storage for distributed PyTorch checkpoints.

Save and load state dicts by URI (``/ckpt/step-100``, ``file:///...``, or any
scheme an installed plugin serves); every rank calls the same function and a
coordinator-driven protocol commits one consistent checkpoint.
"""

from torchstow.api import (
    delete,
    info,
    latest,
    list_checkpoints,
    load,
    load_state_dict,
    local_metadata,
    read,
    save,
    save_state_dict,
    storage_reader,
    storage_writer,
)
from torchstow.core.backend import Backend, StoreBackend
from torchstow.core.errors import (
    CheckpointException,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
    PickleNotAllowedError,
    RemoteError,
    StateDictMismatchError,
    TorchstowError,
    UnknownBackendError,
)
from torchstow.core.metadata import (
    BytesStorageMetadata,
    CheckpointInfo,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.core.planning import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
)
from torchstow.core.storage import StorageReader, StorageWriter, WriteResult
from torchstow.core.store import ByteStore, FileSink
from torchstow.plugins.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ByteStore",
    "BytesStorageMetadata",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointTimeoutError",
    "ChecksumMismatchError",
    "ChunkStorageMetadata",
    "CorruptCheckpointError",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "FileSink",
    "FormatVersionError",
    "IncompleteCheckpointError",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "MetadataIndex",
    "PickleNotAllowedError",
    "ReadItem",
    "RemoteError",
    "SavePlan",
    "SavePlanner",
    "StateDictMismatchError",
    "StorageReader",
    "StorageWriter",
    "StoreBackend",
    "TensorProperties",
    "TensorStorageMetadata",
    "TorchstowError",
    "UnknownBackendError",
    "WriteItem",
    "WriteResult",
    "delete",
    "hookimpl",
    "info",
    "latest",
    "list_checkpoints",
    "load",
    "load_state_dict",
    "local_metadata",
    "read",
    "save",
    "save_state_dict",
    "storage_reader",
    "storage_writer",
]
