"""How core code that is handed a URI (the checkpointer, the writer process,
the replication stager) reaches storage.

Core knows no backend and does not import the plugin layer: the API layer
(:mod:`torchstow.api`) installs the resolver when torchstow is imported,
mapping URIs to storage writers and readers through the installed plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchstow.core.storage.interfaces import StorageReader, StorageWriter

__all__ = ["install", "open_reader", "open_writer"]

WriterOpener = Callable[..., StorageWriter]
ReaderOpener = Callable[..., StorageReader]

_openers: tuple[WriterOpener, ReaderOpener] | None = None


def install(writer: WriterOpener, reader: ReaderOpener) -> None:
    """Set how URIs open: ``writer(uri, overwrite=..., **options)`` and ``reader(uri, **options)``."""
    global _openers
    _openers = (writer, reader)


def _installed() -> tuple[WriterOpener, ReaderOpener]:
    if _openers is None:
        raise RuntimeError("no URI resolver is installed: import torchstow, whose API layer installs it")
    return _openers


def open_writer(uri: str, *, overwrite: bool = False, **options: Any) -> StorageWriter:
    """A storage writer for a checkpoint at ``uri``."""
    return _installed()[0](uri, overwrite=overwrite, **options)


def open_reader(uri: str, **options: Any) -> StorageReader:
    """A storage reader for the checkpoint at ``uri``."""
    return _installed()[1](uri, **options)
