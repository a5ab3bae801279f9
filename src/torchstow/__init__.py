"""torchstow: pluggable storage for distributed PyTorch checkpoints.

Save and load state dicts by URI (``/ckpt/step-100``, ``file:///...``, or any
scheme an installed plugin serves); every rank calls the same function and a
coordinator-driven protocol commits one consistent checkpoint.
"""

from torchstow.api import (
    async_save,
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
from torchstow.checkpointing.async_save import AsyncSave
from torchstow.checkpointing.barriers import (
    Barrier,
    BarrierConfig,
    DistBarrier,
    TCPStoreBarrier,
    register_barrier,
)
from torchstow.checkpointing.checkpoint_io import (
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    WriterHook,
)
from torchstow.checkpointing.checkpointer import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointerConfig,
    SyncCheckpointer,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from torchstow.checkpointing.rank_info import RankInfo
from torchstow.checkpointing.replication import ReplicationStager
from torchstow.checkpointing.writer_process import (
    CheckpointProcess,
    CheckpointProcessConfig,
    WriterProcessError,
    WriterProcessTimeoutError,
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
from torchstow.core.staging.stager import CheckpointStagerConfig, DefaultStager, StateDictStager
from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, WriteResult
from torchstow.core.storage.retry import RetryPolicy
from torchstow.core.storage.store import ByteStore, FileSink, StorageFullError, StorageIOError
from torchstow.errors import (
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
from torchstow.format.manifest import (
    BytesStorageMetadata,
    CheckpointInfo,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.interop import dcp_storage_reader, dcp_storage_writer
from torchstow.interop.convert import ConvertReport, convert
from torchstow.management import CheckpointManager, VerifyReport, copy, prune, verify
from torchstow.management.gc import gc
from torchstow.plugins.hookspecs import hookimpl
from torchstow.plugins.manager import BackendEntry, PluginConflictError

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointer",
    "AsyncSave",
    "Backend",
    "BackendEntry",
    "Barrier",
    "BarrierConfig",
    "ByteStore",
    "BytesStorageMetadata",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStagerConfig",
    "CheckpointTimeoutError",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "ChecksumMismatchError",
    "ChunkStorageMetadata",
    "ConvertReport",
    "CorruptCheckpointError",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "DefaultStager",
    "DistBarrier",
    "FileSink",
    "FormatVersionError",
    "IncompleteCheckpointError",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "MetadataIndex",
    "PickleNotAllowedError",
    "PluginConflictError",
    "RankInfo",
    "ReadItem",
    "RemoteError",
    "ReplicationStager",
    "RetryPolicy",
    "SavePlan",
    "SavePlanner",
    "StateDictMismatchError",
    "StateDictStager",
    "StorageFullError",
    "StorageIOError",
    "StorageReader",
    "StorageWriter",
    "StoreBackend",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "TensorProperties",
    "TensorStorageMetadata",
    "TorchstowError",
    "UnknownBackendError",
    "VerifyReport",
    "WriteItem",
    "WriteResult",
    "WriterHook",
    "WriterProcessError",
    "WriterProcessTimeoutError",
    "async_save",
    "available_backends",
    "convert",
    "copy",
    "dcp_storage_reader",
    "dcp_storage_writer",
    "delete",
    "gc",
    "hookimpl",
    "info",
    "latest",
    "list_checkpoints",
    "load",
    "load_state_dict",
    "local_metadata",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "prune",
    "read",
    "register_barrier",
    "save",
    "save_state_dict",
    "storage_reader",
    "storage_writer",
    "verify",
]
