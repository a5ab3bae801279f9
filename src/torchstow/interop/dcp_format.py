"""Reading checkpoints written by stock ``dcp.save`` (a ``.metadata`` file and ``*.distcp`` data files).

DCP pickles its ``.metadata``. It is decoded here by a restricted unpickler
that admits only DCP's metadata classes and torch's size, dtype, layout and
memory-format types (plus the path class DCP records the checkpoint id
with): any other reference is a :class:`CorruptCheckpointError` and nothing
in the file is executed. Each tensor chunk in a ``.distcp`` file is a
``torch.save`` blob, read back with ``torch.load(weights_only=True)``;
objects stay opaque bytes for the same restricted loader. DCP writes no
checksums, so none are verified.

The functions :func:`is_dcp_checkpoint` and :func:`read_dcp_metadata` serve
any caller that holds a URI; :func:`detecting_reader` is how ``load`` and
``read`` reach either format through one reader.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from torchstow.core.futures import completed_future
from torchstow.core.layout.reader import raise_if_missing, require_data
from torchstow.core.planning import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.core.storage.interfaces import StorageReader
from torchstow.core.storage.store import ByteStore
from torchstow.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from torchstow.format.files import DCP_METADATA
from torchstow.format.manifest import (
    EncodedLocations,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorStorageMetadata,
)
from torchstow.format.validation import check_decoded, check_extents, missing_file_error

__all__ = [
    "DCP_METADATA",
    "DcpFormatReader",
    "DetectingReader",
    "decode_dcp_metadata",
    "detecting_reader",
    "is_dcp_checkpoint",
    "read_any_metadata",
    "read_dcp_metadata",
]


_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


_MAX_KEY_DEPTH = 32  # a DCP key nests 3 deep (MetadataIndex, its offsets, an int)
# Values visited hashing keys and checking arguments: this plus one per byte of the file
# (about ten times what DCP's own metadata takes).
_BASE_WORK = 100_000
_ATOMS = frozenset({str, int, float, bool, bytes, type(None)})


class _RestrictedUnpickler(pickle._Unpickler):
    """Admits DCP's metadata classes and torch's value types, nothing else, and bounds
    its work: Python's pickle machine (whose every step can be checked, unlike C's)
    checks each value before it is hashed (a dict key, a set member) or passed to a
    class, so a few hundred bytes of tuples sharing memo entries cannot make hashing
    run for hours. A refusal is an UnpicklingError."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._work = _BASE_WORK + len(data)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            if name == "Size":
                return torch.Size
            value = getattr(torch, name, None)
            if isinstance(value, _TORCH_VALUES):
                return value
        elif name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata file")

    def _charge(self, values: Iterable[Any]) -> None:
        """Visit ``values`` as hashing them would (dataclass fields, tuple items, and the
        items of lists and dicts passed as arguments), within the work left. Strings
        and numbers cost nothing here: hashing one is linear, once."""
        todo = [(value, 1) for value in values if type(value) not in _ATOMS]
        while todo:
            value, depth = todo.pop()
            self._work -= 1
            if self._work < 0:
                raise pickle.UnpicklingError(
                    "hashing and checking its values takes more work than DCP metadata of its size needs"
                )
            if depth > _MAX_KEY_DEPTH:
                raise pickle.UnpicklingError(f"a key or argument nests deeper than {_MAX_KEY_DEPTH} levels")
            if isinstance(value, (tuple, list, set, frozenset)):
                items: Iterable[Any] = value
            elif isinstance(value, dict):
                items = (item for pair in value.items() for item in pair)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                items = vars(value).values()
            else:
                continue
            todo.extend((item, depth + 1) for item in items if type(item) not in _ATOMS)


def _bound(op: bytes, picks: Callable[[Any], Iterable[Any]]) -> None:
    """Have the restricted unpickler charge the values ``picks`` selects before ``op``."""
    run: Callable[[Any], None] = pickle._Unpickler.dispatch[op[0]]

    def step(self: _RestrictedUnpickler) -> None:
        self._charge(picks(self))
        run(self)

    _RestrictedUnpickler.dispatch[op[0]] = step


_bound(pickle.SETITEM, lambda u: u.stack[-2:-1])  # the key
_bound(pickle.SETITEMS, lambda u: u.stack[::2])  # the keys, above the mark
_bound(pickle.ADDITEMS, lambda u: u.stack)  # set members
_bound(pickle.FROZENSET, lambda u: u.stack)
_bound(pickle.REDUCE, lambda u: u.stack[-1:])  # a class's arguments (an enum hashes its value)
_bound(pickle.NEWOBJ, lambda u: u.stack[-1:])
_bound(pickle.NEWOBJ_EX, lambda u: u.stack[-2:])
_bound(pickle.OBJ, lambda u: u.stack)
_bound(pickle.INST, lambda u: u.stack)
_bound(pickle.BUILD, lambda u: list(u.stack[-1]) if isinstance(u.stack[-1], dict) else u.stack[-1:])


def decode_dcp_metadata(data: bytes, *, source: str = DCP_METADATA) -> Metadata:
    """A DCP ``.metadata`` file's content as a torchstow manifest; never runs its code.

    Raises CorruptCheckpointError for anything but DCP metadata, and
    FormatVersionError for data stored with DCP's storage extensions
    (compression and the like), which torchstow does not read.
    """
    from torch.distributed.checkpoint import metadata as dcp_md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from torchstow.interop import dcp_types as conv

    try:
        md = _RestrictedUnpickler(data).load()
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{source} is not DCP metadata torchstow can read safely: {exc}"
        ) from exc
    if not isinstance(md, dcp_md.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CorruptCheckpointError(f"{source} does not hold DCP Metadata (found {type(md).__name__})")
    entry_types = (dcp_md.TensorStorageMetadata, dcp_md.BytesStorageMetadata)
    locations = md.storage_data
    if not isinstance(locations, dict):
        raise CorruptCheckpointError(f"{source} records no data locations")
    try:
        if not all(
            isinstance(k, str) and isinstance(v, entry_types) for k, v in md.state_dict_metadata.items()
        ):
            raise TypeError("an entry is not tensor or bytes metadata")
        entries = conv.ts_metadata_entries(md.state_dict_metadata)
        found: dict[MetadataIndex, StorageInfo] = {}
        for index, info in locations.items():
            if not isinstance(index, dcp_md.MetadataIndex) or not isinstance(info, _StorageInfo):
                raise TypeError(f"a data location is a {type(info).__name__}")
            if type(index.fqn) is not str or type(info.relative_path) is not str:
                raise TypeError(  # named by type only: a hostile value may be costly to print
                    f"a data location has a {type(index.fqn).__name__} key and a "
                    f"{type(info.relative_path).__name__} file name, not strings"
                )
            if info.transform_descriptors:
                raise FormatVersionError(
                    f"{source}: {index.fqn} is stored with DCP storage extensions "
                    f"{[d for d in info.transform_descriptors if type(d) is str]}, which torchstow "
                    "does not read; use dcp.load"
                )
            if os.path.basename(info.relative_path) != info.relative_path:
                raise ValueError(
                    f"data file name {info.relative_path!r} of {index.fqn!r} is not a plain file name"
                )
            found[conv.ts_index(index)] = StorageInfo(info.relative_path, int(info.offset), int(info.length))
        planner_data = conv.planner_data_from_mappings(md.planner_data, entries)
        # A chunk is a torch.save blob: never fewer bytes than its elements take.
        check_decoded(
            entries, found, min_bytes=lambda count, itemsize: count * itemsize, planner_data=planner_data
        )
    except FormatVersionError:
        raise
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{source} is malformed DCP metadata: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{source} is malformed DCP metadata: {exc}") from exc
    return Metadata(
        state_dict_metadata=entries, planner_data=planner_data, storage_data=_DcpLocations(found), version=0
    )


class _DcpLocations(EncodedLocations):
    """The data locations of a DCP-format checkpoint (they mark its manifest as such)."""


def _store_of(backend: Backend, uri: str) -> ByteStore | None:
    return backend.open_store(uri) if isinstance(backend, StoreBackend) else None


def _is_dcp_store(store: ByteStore) -> bool:
    return DCP_METADATA in store.list_files()


def _read_store_metadata(store: ByteStore) -> Metadata:
    try:
        data = store.read_file(DCP_METADATA)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint at {store.location}") from None
    metadata = decode_dcp_metadata(data, source=f"{store.location}/{DCP_METADATA}")
    sizes = store.file_sizes()
    if sizes is not None:  # before anything is allocated for the data
        check_extents(metadata.storage_data.items(), sizes, store.location)
    return metadata


def _backend(uri: str, storage_options: dict[str, Any] | None) -> Backend:
    from torchstow.plugins.manager import default_registry

    return default_registry().backend_for(uri, storage_options)


def is_dcp_checkpoint(uri: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``uri`` holds a checkpoint in DCP's format (a ``.metadata`` file)."""
    text = os.fspath(uri)
    store = _store_of(_backend(text, storage_options), text)
    return store is not None and _is_dcp_store(store)


def read_dcp_metadata(
    uri: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> Metadata:
    """The manifest of the DCP-format checkpoint at ``uri``, as torchstow's
    (CheckpointNotFoundError when there is none)."""
    text = os.fspath(uri)
    store = _store_of(_backend(text, storage_options), text)
    if store is None:
        raise CheckpointNotFoundError(f"the backend of {text} cannot hold DCP-format checkpoints")
    return _read_store_metadata(store)


def read_any_metadata(backend: Backend, uri: str) -> Metadata:
    """The manifest at ``uri``: torchstow's, else a DCP ``.metadata`` read as one."""
    try:
        return backend.read_metadata(uri)
    except CheckpointNotFoundError:
        store = _store_of(backend, uri)
        if store is None or not _is_dcp_store(store):
            raise
        return _read_store_metadata(store)


class DcpFormatReader(StorageReader):
    """A torchstow StorageReader for the DCP-format checkpoint in ``store`` (bound to
    it: :class:`DetectingReader` makes a new one for each load)."""

    def __init__(self, store: ByteStore) -> None:
        self.store = store
        self.locations: dict[MetadataIndex, StorageInfo] = {}
        self._missing: set[str] = set()
        self._beyond: dict[MetadataIndex, str] = {}  # locations past their file's end: the error
        self._checked: Metadata | None = None  # the metadata _missing was found for

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return _read_store_metadata(self.store)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.metadata = metadata
        self.locations = metadata.storage_data
        self._check_files(metadata)

    def _check_files(self, metadata: Metadata) -> None:
        """Every location inside its file, and which listed files are missing."""
        if metadata is self._checked:
            return
        sizes = self.store.file_sizes()
        self._missing = set()
        self._beyond = {}
        if sizes is not None:
            self._missing = check_extents(
                metadata.storage_data.items(), sizes, self.store.location, self._beyond
            )
        self._checked = metadata

    def require_data(self, metadata: Metadata, keys: Iterable[str]) -> None:
        """Raise CorruptCheckpointError if an item of ``keys`` lies in a missing ``.distcp``
        file or past its end (before anything is allocated for them)."""
        self._check_files(metadata)
        raise_if_missing(self.store.location, metadata.storage_data, self._missing, keys, self._beyond)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _payload(self, index: MetadataIndex) -> bytes:
        info = self.locations.get(index)
        if info is None:
            raise CorruptCheckpointError(
                f"{self.store.location}/{DCP_METADATA} has no data location for {index}"
            )
        if info.relative_path in self._missing:
            raise missing_file_error(self.store.location, info.relative_path, index.fqn)
        if index in self._beyond:
            raise CorruptCheckpointError(self._beyond[index])
        buf = bytearray(info.length)
        try:
            self.store.read_into(info.relative_path, [(info.offset, memoryview(buf))])
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"{self.store.location}/{info.relative_path} is missing, though {DCP_METADATA} lists it"
            ) from exc
        return bytes(buf)

    def _chunk(self, item: ReadItem) -> torch.Tensor:
        index = item.storage_index
        try:
            tensor = torch.load(io.BytesIO(self._payload(index)), weights_only=True, map_location="cpu")
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{self.store.location}: the data of {index} does not load: {exc}"
            ) from exc
        entry = self.metadata.state_dict_metadata[index.fqn]
        assert isinstance(entry, TensorStorageMetadata)
        sizes = next((c.sizes for c in entry.chunks if c.offsets == index.offset), None)
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.shape != sizes
            or tensor.dtype != entry.properties.dtype
        ):
            raise CorruptCheckpointError(
                f"{self.store.location}: the data of {index} is not the {entry.properties.dtype} chunk "
                f"of shape {list(sizes or [])} the metadata describes"
            )
        return tensor

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        cached: tuple[MetadataIndex | None, torch.Tensor | None] = (None, None)
        for item in sorted(plan.items, key=_by_location(self.locations)):
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(self._payload(item.storage_index)))
                continue
            if cached[0] != item.storage_index:
                cached = (item.storage_index, self._chunk(item))
            source = cached[1]
            assert source is not None
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                source = source.narrow(dim, start, length)
            target = planner.resolve_tensor(item)
            with torch.no_grad():
                target.copy_(source)
            planner.commit_tensor(item, target)
        return completed_future(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


def _by_location(locations: dict[MetadataIndex, StorageInfo]) -> Callable[[ReadItem], tuple[str, int]]:
    def key(item: ReadItem) -> tuple[str, int]:
        info = locations.get(item.storage_index)
        return ("", -1) if info is None else (info.relative_path, info.offset)

    return key


class DetectingReader(StorageReader):
    """Reads the checkpoint at a URI in torchstow's format or, where there is
    no torchstow manifest but a DCP ``.metadata``, in DCP's."""

    def __init__(self, backend: StoreBackend, uri: str) -> None:
        self.backend = backend
        self.uri = uri
        self.inner: StorageReader = backend.storage_reader(uri)
        self.active: StorageReader = self.inner

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.uri = os.fspath(checkpoint_id)
        self.inner.reset(checkpoint_id)
        self.active = self.inner

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            return self.inner.read_metadata()
        except CheckpointNotFoundError:
            store = self.backend.open_store(self.uri)
            if not _is_dcp_store(store):
                raise
            return _read_store_metadata(store)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(metadata.storage_data, _DcpLocations):
            self.active = DcpFormatReader(self.backend.open_store(self.uri))
        self.active.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def require_data(self, metadata: Metadata, keys: Iterable[str]) -> None:
        """The missing-file check of the format ``metadata`` was read in (see
        :func:`torchstow.core.layout.reader.require_data`)."""
        if isinstance(metadata.storage_data, _DcpLocations):
            DcpFormatReader(self.backend.open_store(self.uri)).require_data(metadata, keys)
        else:
            require_data(self.inner, metadata, keys)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.active.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self.active.prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        return self.active.read_data(plan, planner)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


def detecting_reader(backend: Backend, uri: str) -> StorageReader:
    """The reader for ``uri``: one that also reads DCP's format where the backend is a byte store."""
    if isinstance(backend, StoreBackend):
        return DetectingReader(backend, uri)
    return backend.storage_reader(uri)
