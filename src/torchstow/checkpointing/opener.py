"""How the URI-taking engines (checkpointers, the writer process, replication) open storage.

A :class:`StorageOpener` is handed to them explicitly. It holds only the
storage options, so it pickles into a writer process, where it resolves URIs
through that process's own plugin registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torchstow.core.storage.interfaces import StorageReader, StorageWriter
from torchstow.plugins.manager import default_registry

__all__ = ["StorageOpener"]


@dataclass(frozen=True)
class StorageOpener:
    """Opens storage writers and readers for URIs through the installed plugins,
    with ``storage_options`` for the backend."""

    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def writer(self, uri: str, *, overwrite: bool = False) -> StorageWriter:
        """A writer for a checkpoint at ``uri``."""
        backend = default_registry().backend_for(uri, dict(self.storage_options))
        return backend.storage_writer(uri, overwrite=overwrite)

    def reader(self, uri: str) -> StorageReader:
        """A reader for the checkpoint at ``uri``."""
        return default_registry().backend_for(uri, dict(self.storage_options)).storage_reader(uri)
