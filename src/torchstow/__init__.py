"""torchstow: pluggable storage for distributed PyTorch checkpoints.

Save and load state dicts by URI (``/ckpt/step-100``, ``file:///...``, or any
scheme an installed plugin serves); every rank calls the same function and a
coordinator-driven protocol commits one consistent checkpoint.

This namespace holds what training code calls, and the errors. Plugin authors
import :mod:`torchstow.spi`, planner authors :mod:`torchstow.planning`; the
mirrors of DCP's ``_experimental`` API (checkpointers, stagers, barriers) live in
:mod:`torchstow.checkpointing`, and :mod:`torchstow.dcp` is a drop-in for
``torch.distributed.checkpoint``.
"""

from torchstow.api import (
    async_save,
    load,
    read,
    save,
    storage_reader,
    storage_writer,
)
from torchstow.checkpointing.async_save import AsyncSave, SaveStats
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
    PluginConflictError,
    RemoteError,
    StateDictMismatchError,
    StorageFullError,
    StorageIOError,
    TorchstowError,
    UnknownBackendError,
)
from torchstow.format.manifest import CheckpointInfo, Metadata
from torchstow.interop import dcp_storage_reader, dcp_storage_writer
from torchstow.interop.convert import ConvertReport, convert
from torchstow.management import CheckpointManager, VerifyReport, copy, prune, verify
from torchstow.management.catalog import delete, info, latest, list_checkpoints
from torchstow.management.gc import gc

__version__ = "0.1.0"

__all__ = [
    "AsyncSave",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointTimeoutError",
    "ChecksumMismatchError",
    "ConvertReport",
    "CorruptCheckpointError",
    "FormatVersionError",
    "IncompleteCheckpointError",
    "Metadata",
    "PickleNotAllowedError",
    "PluginConflictError",
    "RemoteError",
    "SaveStats",
    "StateDictMismatchError",
    "StorageFullError",
    "StorageIOError",
    "TorchstowError",
    "UnknownBackendError",
    "VerifyReport",
    "async_save",
    "convert",
    "copy",
    "dcp_storage_reader",
    "dcp_storage_writer",
    "delete",
    "gc",
    "info",
    "latest",
    "list_checkpoints",
    "load",
    "prune",
    "read",
    "save",
    "storage_reader",
    "storage_writer",
    "verify",
]
