"""Forwarding bases for wrappers: a writer, reader or byte store that hands every call
to ``inner``. Subclass one and override only the steps the wrapper changes (a hook
before the commit, an injected fault, a corrupting sink).

A byte store's optional capabilities (:meth:`~ByteStore.local_path`,
:meth:`~ByteStore.adopt`, :meth:`~ByteStore.file_sizes`) hold for the wrapper only
if it keeps the bytes as they are: they are forwarded unless the wrapper declares
``transforms_bytes = True`` (compression, encryption, a corrupting test store), which
gets the safe defaults instead (nothing to map, no file shared, sizes unknown).
What says nothing about the bytes is always forwarded: when each file last changed
(:meth:`~ByteStore.file_times`, which gc dates debris by) and the uploads begun and
never finished (:meth:`~ByteStore.pending_uploads`, :meth:`~ByteStore.abort_upload`).
A wrapper with a ``read_into`` of its own sees every data read: :meth:`~ByteStore.read_in_order`
then goes through it, else to ``inner``'s; one with a ``read_file`` of its own sees every
whole-file read (:meth:`~ByteStore.read_small_file` goes through it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torchstow.core.futures import AnyFuture
from torchstow.core.planning import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, WriteResult
from torchstow.core.storage.store import ByteStore, FileSink, PendingUpload, read_bounded
from torchstow.format.files import is_manifest_file
from torchstow.format.manifest import Metadata

__all__ = ["ForwardingByteStore", "ForwardingStorageReader", "ForwardingStorageWriter"]


class ForwardingStorageWriter(StorageWriter):
    """A writer that hands every call to ``inner``."""

    def __init__(self, inner: StorageWriter) -> None:
        self.inner = inner

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.inner.reset(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return self.inner.prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> AnyFuture:
        return self.inner.write_data(plan, planner)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.inner.finish(metadata, results)

    def renew_plan(self, plan: SavePlan) -> SavePlan | None:
        return self.inner.renew_plan(plan)

    def abort(self) -> None:
        self.inner.abort()

    def commit_outcome(self) -> bool | None:
        return self.inner.commit_outcome()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


class ForwardingStorageReader(StorageReader):
    """A reader that hands every call to ``inner``."""

    def __init__(self, inner: StorageReader) -> None:
        self.inner = inner

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.inner.reset(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.inner.read_metadata(*args, **kwargs)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.inner.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self.inner.prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> AnyFuture:
        return self.inner.read_data(plan, planner)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


class ForwardingByteStore(ByteStore):
    """A byte store that hands every call to ``inner`` (same location, same read segment size).

    ``transforms_bytes`` declares whether the files this wrapper shows differ from
    ``inner``'s (see the module's docstring): False forwards every capability.
    """

    transforms_bytes: ClassVar[bool] = False

    def __init__(self, inner: ByteStore) -> None:
        self.inner = inner
        self.location = inner.location
        self.read_segment_bytes = inner.read_segment_bytes

    def ensure_capacity(self, nbytes: int) -> None:
        self.inner.ensure_capacity(nbytes)

    def prepare(self) -> None:
        self.inner.prepare()

    def create(self, name: str) -> FileSink:
        return self.inner.create(name)

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        self.inner.read_into(name, requests)

    def read_in_order(
        self, name: str, requests: Sequence[tuple[int, memoryview]], landed: Callable[[int], None]
    ) -> None:
        """The inner store's own, unless this wrapper's class has a ``read_into`` of its own
        (then every byte goes through it)."""
        if type(self).read_into is ForwardingByteStore.read_into:
            self.inner.read_in_order(name, requests, landed)
        else:
            super().read_in_order(name, requests, landed)

    def read_file(self, name: str) -> bytes:
        return self.inner.read_file(name)

    def read_small_file(self, name: str, limit: int) -> bytes | None:
        """The inner store's own, unless this wrapper's class has a ``read_file`` of its own:
        then the file goes through it, its size told first by the inner store where the
        bytes at rest are the file's (the wrapper keeps them, or it is a manifest's file),
        else by this store (a one-byte read at ``limit`` through its ``read_into``)."""
        if type(self).read_file is ForwardingByteStore.read_file:
            return self.inner.read_small_file(name, limit)
        at_rest = not self.transforms_bytes or is_manifest_file(name)
        return read_bounded(self, name, limit, sizes_from=self.inner if at_rest else self)

    def publish(self, name: str, data: bytes) -> None:
        self.inner.publish(name, data)

    def publish_new(self, name: str, data: bytes) -> None:
        self.inner.publish_new(name, data)

    def local_path(self, name: str) -> str | None:
        return None if self.transforms_bytes else self.inner.local_path(name)

    def adopt(self, other: ByteStore, name: str) -> bool:
        return not self.transforms_bytes and self.inner.adopt(other, name)

    def can_adopt(self) -> bool:
        return not self.transforms_bytes and self.inner.can_adopt()

    def file_sizes(self) -> dict[str, int] | None:
        return None if self.transforms_bytes else self.inner.file_sizes()

    def file_times(self) -> dict[str, float] | None:
        return self.inner.file_times()

    def pending_uploads(self) -> list[PendingUpload]:
        return self.inner.pending_uploads()

    def abort_upload(self, upload: PendingUpload) -> None:
        self.inner.abort_upload(upload)

    def list_files(self) -> list[str]:
        return self.inner.list_files()

    def delete_files(self, names: Sequence[str]) -> None:
        self.inner.delete_files(names)

    def remove_location(self) -> None:
        self.inner.remove_location()
