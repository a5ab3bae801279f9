"""The storage protocol: StorageWriter/Reader, the byte store, backends, retries.

Also the old import path ``torchstow.core.storage``: its public names are
re-exported here.
"""

from torchstow.core.futures import completed_future, wait_future
from torchstow.core.storage.forwarding import ForwardingStorageWriter
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, WriteResult

__all__ = [
    "ForwardingStorageWriter",
    "StorageReader",
    "StorageWriter",
    "WriteResult",
    "completed_future",
    "wait_future",
]
