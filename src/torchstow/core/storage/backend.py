"""What a storage plugin registers: a :class:`Backend` class owning its URI schemes.

A backend builds the storage writer/reader for one checkpoint URI and knows
how to list and delete checkpoints. Most backends are byte stores: subclass
:class:`StoreBackend`, implement ``open_store`` and ``list_children``, and the
core's layout does the rest.
"""

from __future__ import annotations

import abc
from collections.abc import Collection
from typing import ClassVar

from torchstow.core.layout.commit import committed_files
from torchstow.core.layout.location import read_manifest
from torchstow.core.layout.reader import LayoutReader
from torchstow.core.layout.writer import LayoutWriter
from torchstow.core.storage.interfaces import StorageReader, StorageWriter
from torchstow.core.storage.store import ByteStore
from torchstow.errors import CheckpointNotFoundError
from torchstow.format.files import MANIFEST, is_checkpoint_file, is_data_file
from torchstow.format.manifest import Metadata

__all__ = ["Backend", "DirectoryBackend", "StoreBackend"]


class Backend(abc.ABC):
    """A kind of storage, reachable through the URI schemes in ``schemes``.

    The constructor takes the caller's ``storage_options`` as keywords; an
    unknown option is a TypeError naming it and the accepted ones (see
    :meth:`extra_storage_options` for a constructor that takes ``**kwargs``).
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def extra_storage_options(cls, uri: str) -> Collection[str] | None:
        """For a constructor that takes ``**kwargs``: the option names it passes on for
        ``uri``, besides its named parameters. ``None`` (the default) lets any name
        through, for a backend that checks them itself (as a wrapper does through
        :func:`torchstow.spi.open_backend`)."""
        return None

    @abc.abstractmethod
    def storage_writer(self, uri: str, *, overwrite: bool = False) -> StorageWriter:
        """A writer that saves one checkpoint at ``uri``."""

    @abc.abstractmethod
    def storage_reader(self, uri: str) -> StorageReader:
        """A reader that loads the checkpoint at ``uri``."""

    @abc.abstractmethod
    def read_metadata(self, uri: str) -> Metadata:
        """The committed manifest at ``uri`` (CheckpointNotFoundError if none); a byte
        store's may be a DCP ``.metadata`` read as one."""

    @abc.abstractmethod
    def list_children(self, prefix: str) -> list[str]:
        """URIs of the entries directly under ``prefix`` (candidates for checkpoints),
        in the same form as ``prefix``; [] when ``prefix`` does not exist."""

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the checkpoint at ``uri``, manifest first."""


class StoreBackend(Backend):
    """A backend made of a :class:`ByteStore` per checkpoint location.

    ``thread_count`` sets the writer and reader threads (and data files) per
    rank; ``verify_checksums=False`` skips verification on load.
    """

    def __init__(self, *, thread_count: int | None = None, verify_checksums: bool = True) -> None:
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"the storage option thread_count must be at least 1, got {thread_count}")
        self.thread_count = thread_count
        self.verify_checksums = verify_checksums

    @abc.abstractmethod
    def open_store(self, uri: str) -> ByteStore:
        """The store for the checkpoint location ``uri``."""

    def tuned_by(self, uri: str) -> StoreBackend:
        """The backend whose ``thread_count`` and ``verify_checksums`` apply at ``uri``: this
        one; a wrapper's is the backend it wraps (so a wrapped S3 store keeps S3's threads)."""
        return self

    def storage_writer(self, uri: str, *, overwrite: bool = False) -> StorageWriter:
        return LayoutWriter(
            self.open_store(uri),
            overwrite=overwrite,
            thread_count=self.tuned_by(uri).thread_count,
            open_store=self.open_store,
        )

    def storage_reader(self, uri: str) -> StorageReader:
        """A :class:`LayoutReader`: it reads torchstow's format, or DCP's where it finds a
        ``.metadata`` and no torchstow manifest."""
        tuning = self.tuned_by(uri)
        return LayoutReader(
            self.open_store(uri),
            thread_count=tuning.thread_count,
            verify_checksums=tuning.verify_checksums,
            open_store=self.open_store,
        )

    def read_metadata(self, uri: str) -> Metadata:
        return read_manifest(self.open_store(uri), dcp=True)

    def delete(self, uri: str) -> None:
        """Remove the checkpoint at ``uri``, manifest first: the files torchstow writes there
        (:func:`~torchstow.format.files.is_checkpoint_file`) and any other data file its
        manifest names; other files (a user's ``data-notes.bin``) stay, and so does the location."""
        store = self.open_store(uri)
        files = store.list_files()
        ours = [f for f in files if is_checkpoint_file(f)]
        if MANIFEST not in files and not ours:
            raise CheckpointNotFoundError(f"no checkpoint at {store.location}")
        odd = [f for f in files if is_data_file(f) and f not in ours]
        if odd and MANIFEST in files:  # named otherwise than torchstow names them (read only then)
            named = committed_files(store)
            ours += [f for f in odd if f in named]
        if MANIFEST in files:
            store.delete_files([MANIFEST])
        store.delete_files(ours)
        if len(ours) + (MANIFEST in files) == len(files):
            store.remove_location()


class DirectoryBackend(StoreBackend):
    """A :class:`StoreBackend` whose checkpoints are directories (or object prefixes)
    under a prefix: implement :meth:`child_names` and ``list_children`` comes for free."""

    @abc.abstractmethod
    def child_names(self, prefix: str) -> list[str]:
        """Names of the directories directly under ``prefix``; [] when it does not exist."""

    def list_children(self, prefix: str) -> list[str]:
        base = prefix if prefix.endswith("/") else prefix + "/"
        return [base + name for name in sorted(self.child_names(prefix))]
