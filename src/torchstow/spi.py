"""The plugin SDK: everything a backend author imports, from one place.

A byte-store plugin subclasses :class:`ByteStore` (and :class:`FileSink`) for
one checkpoint location and :class:`StoreBackend` (or :class:`DirectoryBackend`
when checkpoints are directories or object prefixes) for its URI schemes, then
registers the backend class from a :data:`hookimpl`. A wrapper plugin reaches
the backend it wraps with :func:`open_backend` and overrides only what it
changes on the ``Forwarding*`` bases. ``docs/plugins.md`` says who calls what,
and when. Plugin authors import this module only (not ``torchstow.core.*``).
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
from torchstow.core.storage.store import Buffer, ByteStore, FileSink, NotDurableError, PendingUpload
from torchstow.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PluginConflictError,
    StorageFullError,
    StorageIOError,
    TorchstowError,
)
from torchstow.format.files import MANIFEST, is_manifest_file, temporary_name
from torchstow.format.manifest import Metadata
from torchstow.plugins.hookspecs import Register, hookimpl
from torchstow.plugins.manager import BackendEntry, default_registry, open_backend
from torchstow.plugins.wrapper import REQUIRED, WrapperBackend, wrapper_storage_options

__all__ = [
    "MANIFEST",
    "REQUIRED",
    "Backend",
    "BackendEntry",
    "Buffer",
    "ByteStore",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DirectoryBackend",
    "ErrorRules",
    "FileSink",
    "ForwardingByteStore",
    "ForwardingStorageReader",
    "ForwardingStorageWriter",
    "IncompleteCheckpointError",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "NotDurableError",
    "PendingUpload",
    "PluginConflictError",
    "Register",
    "RetryPolicy",
    "SavePlan",
    "SavePlanner",
    "StorageFullError",
    "StorageIOError",
    "StorageReader",
    "StorageWriter",
    "StoreBackend",
    "TorchstowError",
    "WrapperBackend",
    "WriteResult",
    "available_backends",
    "completed_future",
    "failed_future",
    "hookimpl",
    "is_manifest_file",
    "open_backend",
    "temporary_name",
    "wait_future",
    "wrapper_storage_options",
]


def available_backends() -> list[BackendEntry]:
    """The installed backends, one entry per URI scheme, sorted by scheme.

    Each entry names the scheme, the backend class, the plugin (entry-point
    name) that registered it and that plugin's distribution version. Plugins
    are discovered once per process; call
    :func:`torchstow.plugins.manager.reset_default_registry` after installing one.
    """
    return default_registry().available()
