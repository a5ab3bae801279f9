"""The plugin SDK: everything a backend author imports, from one place.

A byte-store plugin subclasses :class:`ByteStore` (and :class:`FileSink`) for
one checkpoint location and :class:`StoreBackend` (or :class:`DirectoryBackend`
when checkpoints are directories or object prefixes) for its URI schemes, then
registers the backend class from a :data:`hookimpl`. A wrapper plugin reaches
the backend it wraps with :func:`open_backend` and overrides only what it
changes on the ``Forwarding*`` bases. ``docs/plugins.md`` says who calls what,
and when.
"""

from torchstow.core.futures import completed_future, failed_future, wait_future
from torchstow.core.planning import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torchstow.core.storage.backend import Backend, DirectoryBackend, StoreBackend
from torchstow.core.storage.forwarding import (
    ForwardingByteStore,
    ForwardingStorageReader,
    ForwardingStorageWriter,
)
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, WriteResult
from torchstow.core.storage.retry import ErrorRules, RetryPolicy
from torchstow.core.storage.store import Buffer, ByteStore, FileSink
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageFullError,
    StorageIOError,
)
from torchstow.format.files import MANIFEST, temporary_name
from torchstow.format.manifest import Metadata
from torchstow.plugins.hookspecs import Register, hookimpl
from torchstow.plugins.manager import open_backend

__all__ = [
    "MANIFEST",
    "Backend",
    "Buffer",
    "ByteStore",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DirectoryBackend",
    "ErrorRules",
    "FileSink",
    "ForwardingByteStore",
    "ForwardingStorageReader",
    "ForwardingStorageWriter",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "Register",
    "RetryPolicy",
    "SavePlan",
    "SavePlanner",
    "StorageFullError",
    "StorageIOError",
    "StorageReader",
    "StorageWriter",
    "StoreBackend",
    "WriteResult",
    "completed_future",
    "failed_future",
    "hookimpl",
    "open_backend",
    "temporary_name",
    "wait_future",
]
