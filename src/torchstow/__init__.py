"""torchstow: pluggable storage for distributed PyTorch checkpoints.

Save and load state dicts by URI (``/ckpt/step-100``, ``file:///...``, or any
scheme an installed plugin serves); every rank calls the same function and a
coordinator-driven protocol commits one consistent checkpoint.
"""

from torchstow.api import (
    available_backends,
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
    ChecksumMismatchError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteCheckpointError,
    PickleNotAllowedError,
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
from torchstow.core.retry import RetryPolicy
from torchstow.core.storage import StorageReader, StorageWriter, WriteResult
from torchstow.core.store import ByteStore, FileSink, StorageFullError, StorageIOError
from torchstow.plugins.hookspecs import hookimpl
from torchstow.plugins.manager import BackendEntry, PluginConflictError

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendEntry",
    "ByteStore",
    "BytesStorageMetadata",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
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
    "PluginConflictError",
    "ReadItem",
    "RetryPolicy",
    "SavePlan",
    "SavePlanner",
    "StateDictMismatchError",
    "StorageFullError",
    "StorageIOError",
    "StorageReader",
    "StorageWriter",
    "StoreBackend",
    "TensorProperties",
    "TensorStorageMetadata",
    "TorchstowError",
    "UnknownBackendError",
    "WriteItem",
    "WriteResult",
    "available_backends",
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
