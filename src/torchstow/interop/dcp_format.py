"""Checkpoints written by stock ``dcp.save`` (a ``.metadata`` file and ``*.distcp`` data
files), for callers that hold a URI.

Reading them needs nothing from here: a byte-store backend's reader reads either
format (:mod:`torchstow.core.layout.dcp_reader`), and the ``.metadata`` is decoded
by :mod:`torchstow.format.dcp_metadata` with its restricted unpickler.
"""

from __future__ import annotations

from typing import Any

from torchstow.core.layout.location import read_dcp_manifest
from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import CheckpointNotFoundError
from torchstow.format.files import DCP_METADATA
from torchstow.format.manifest import Metadata
from torchstow.plugins.resolve import Uri, backend_at

__all__ = ["is_dcp_checkpoint", "read_dcp_metadata"]


def is_dcp_checkpoint(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``uri`` holds a checkpoint in DCP's format (a ``.metadata`` file)."""
    text, backend = backend_at(uri, storage_options)
    return isinstance(backend, StoreBackend) and DCP_METADATA in backend.open_store(text).list_files()


def read_dcp_metadata(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> Metadata:
    """The manifest of the DCP-format checkpoint at ``uri``, as torchstow's
    (CheckpointNotFoundError when there is none)."""
    text, backend = backend_at(uri, storage_options)
    if not isinstance(backend, StoreBackend):
        raise CheckpointNotFoundError(f"the backend of {text} cannot hold DCP-format checkpoints")
    return read_dcp_manifest(backend.open_store(text))
