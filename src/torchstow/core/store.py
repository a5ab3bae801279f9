"""Deprecated import path: the byte store lives in :mod:`torchstow.core.storage.store`
(plugin authors: import from :mod:`torchstow.spi`; see docs/architecture.md)."""

from torchstow.core.storage.store import Buffer as Buffer
from torchstow.core.storage.store import ByteStore as ByteStore
from torchstow.core.storage.store import FileSink as FileSink
from torchstow.errors import StorageFullError as StorageFullError
from torchstow.errors import StorageIOError as StorageIOError

__all__ = ["Buffer", "ByteStore", "FileSink", "StorageFullError", "StorageIOError"]
