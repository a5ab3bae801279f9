"""Checkpoint sources: one small interface over every format ``convert`` reads.

A :class:`Source` lists its keys (flat, dotted) with the dtype and shape of
each tensor, and hands out one tensor at a time, so a converter holds a few
tensors in memory, never the whole state. :func:`open_source` detects the
format: a torchstow manifest, a DCP checkpoint (``.metadata``), a
``torch.save`` file, a ``.safetensors`` file or a directory of them with a
``model.safetensors.index.json``.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import torch

from torchstow.core.layout.reader import require_data
from torchstow.core.protocol.materialize import materialize
from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.core.storage.forwarding import ForwardingByteStore
from torchstow.core.storage.interfaces import StorageReader
from torchstow.core.storage.store import ByteStore
from torchstow.errors import (
    CheckpointException,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    PickleNotAllowedError,
    TorchstowError,
)
from torchstow.format.files import DCP_METADATA, MANIFEST, MANIFEST_MAX_BYTES, is_checkpoint_file, too_large
from torchstow.format.manifest import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torchstow.format.structure import build_nested, flatten_state_dict
from torchstow.interop import safetensors_format as stf
from torchstow.plugins.manager import default_registry, scheme_of

__all__ = [
    "DCP_METADATA",
    "DcpSource",
    "SafetensorsSource",
    "Source",
    "TensorSpec",
    "TorchSaveSource",
    "TorchstowSource",
    "file_in_the_way",
    "local_folder",
    "local_path",
    "open_source",
]

_SMALL = 16 << 20  # tensors below this are read in batches (one parallel read per batch)
_BATCH_BYTES = 64 << 20
_BATCH_KEYS = 1024


@dataclass(frozen=True)
class TensorSpec:
    """The dtype and shape of one stored tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Source(abc.ABC):
    """A checkpoint to read from, one tensor at a time.

    ``specs`` maps every flat key, in stored order, to its :class:`TensorSpec`
    (None for a non-tensor value). ``planner_data`` is the recorded nesting
    (None when the keys are the structure). ``read_tensor`` may be called
    from several threads at once.
    """

    format: str = ""
    uri: str
    specs: dict[str, TensorSpec | None]
    user_metadata: dict[str, Any]
    planner_data: Any = None

    @abc.abstractmethod
    def read_tensor(self, key: str) -> torch.Tensor:
        """The full tensor stored under ``key``, on the CPU."""

    @abc.abstractmethod
    def read_object(self, key: str) -> Any:
        """The non-tensor value stored under ``key``."""

    def nest(self, flat: dict[str, Any]) -> dict[Any, Any]:
        """``flat`` (every key of the source) rebuilt into the stored nesting."""
        if self.planner_data is None:
            return flat
        return build_nested(flat, self.planner_data)

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release open files."""


class TorchstowSource(Source):
    """A torchstow checkpoint on any backend. Tensors under 16 MiB are read in batches of
    about 64 MiB (one parallel read each, kept until asked for), larger ones one by one."""

    format = "torchstow"

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        metadata: Metadata | None = None,
        reader: Callable[[], StorageReader] | None = None,
    ) -> None:
        self.uri = uri
        self.backend = default_registry().backend_for(uri, storage_options)
        self.metadata = self.backend.read_metadata(uri) if metadata is None else metadata
        # One reader for every read: it lists the data files once for the metadata.
        self._reader = reader() if reader is not None else self.backend.storage_reader(uri)
        require_data(self._reader, self.metadata, ())  # the listing, before reads from several threads
        self.user_metadata = dict(self.metadata.user_metadata)
        self.planner_data = self.metadata.planner_data
        self.specs = {
            fqn: TensorSpec(entry.properties.dtype, tuple(entry.size))
            if isinstance(entry, TensorStorageMetadata)
            else None
            for fqn, entry in self.metadata.state_dict_metadata.items()
        }
        self._small = [k for k, s in self.specs.items() if s is not None and s.nbytes < _SMALL]
        self._small_pos = {k: i for i, k in enumerate(self._small)}
        self._fetched: set[str] = set()
        self._cache: dict[str, Any] = {}
        self._objects: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _load(self, keys: list[str]) -> dict[str, Any]:
        try:
            return materialize(self._reader, self.metadata, dict.fromkeys(keys))
        except CheckpointException as exc:
            # This one-process load's own error, so that a target's save raises it as its
            # kind (a CheckpointException around a CheckpointException is of no kind).
            causes = [failure for failure, _ in exc.failures.values()]
            if len(causes) != 1 or not isinstance(causes[0], TorchstowError):
                raise
            raise causes[0] from None

    def read_tensor(self, key: str) -> torch.Tensor:
        pos = self._small_pos.get(key)
        if pos is None:
            return self._load([key])[key]
        with self._lock:
            cached = self._cache.pop(key, None)
            if cached is not None:
                return cached
            batch: list[str] = []
            nbytes = 0
            for other in self._small[pos:]:
                if len(batch) >= _BATCH_KEYS or nbytes >= _BATCH_BYTES:
                    break
                if other not in self._fetched:
                    batch.append(other)
                    spec = self.specs[other]
                    nbytes += spec.nbytes if spec is not None else 0
            if key not in batch:
                batch.insert(0, key)
            try:
                loaded = self._load(batch)
            except Exception:
                if len(batch) == 1:
                    raise
                return self._load([key])[key]  # the failure is raised for the key it belongs to
            self._fetched.update(batch)
            tensor = loaded.pop(key)
            self._cache.update(loaded)
            return tensor

    def read_object(self, key: str) -> Any:
        with self._lock:
            if self._objects is None:
                entries = self.metadata.state_dict_metadata
                inline = {
                    k: e.value
                    for k, e in entries.items()
                    if isinstance(e, BytesStorageMetadata) and e.encoding == "json"
                }
                stored = [
                    k for k, e in entries.items() if isinstance(e, BytesStorageMetadata) and k not in inline
                ]
                try:
                    loaded = self._load(stored) if stored else {}
                except TorchstowError:  # each read alone below: a failure is its own key's
                    loaded = {}
                self._objects = {**inline, **loaded}
            if key not in self._objects and isinstance(
                self.metadata.state_dict_metadata.get(key), BytesStorageMetadata
            ):
                self._objects[key] = self._load([key])[key]
            return self._objects[key]


class TorchSaveSource(Source):
    """A ``torch.save`` file, loaded with ``weights_only=True`` (memory-mapped when it can be)."""

    format = "torch"

    def __init__(self, path: str) -> None:
        self.uri = path
        tree = _torch_load(path)
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(
                f"{path} holds a {type(tree).__name__}, not a state dict (a dict of tensors)"
            )
        flat = flatten_state_dict(tree)
        self.user_metadata = {}
        self.planner_data = flat.planner_data()
        self._leaves = flat.leaves
        self.specs = {
            k: TensorSpec(v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else None
            for k, v in flat.leaves.items()
        }

    def read_tensor(self, key: str) -> torch.Tensor:
        return self._leaves[key]

    def read_object(self, key: str) -> Any:
        return self._leaves[key]


_ACCEPTED = (
    "torchstow reads a torchstow or DCP checkpoint (a directory or prefix), a torch.save file, "
    "a .safetensors file, or a directory of safetensors shards"
)


def _torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped when the file is a zip.
    A global the restricted unpickler refuses is a PickleNotAllowedError, any other
    failure a CorruptCheckpointError; both name the file."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if blocked is None:
            raise CorruptCheckpointError(
                f"{path} is not a torch.save file that loads: {_first_line(exc)}; {_ACCEPTED}"
            ) from exc
        raise PickleNotAllowedError(
            f"{path} is a torch.save file whose pickle needs {blocked.group(1)}, which torchstow does "
            "not unpickle (it loads torch.save files with weights_only=True, which runs no code). "
            "If you trust the file, load it with torch.load(path, weights_only=False) and save the "
            "state with torchstow.save(state, uri, allow_pickle=True)"
        ) from exc
    except Exception as exc:  # not a torch.save file at all: text, another format, cut short
        head = b""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(4)
        if head.startswith((b"PK", b"\x80")):
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
        else:
            reason = "it is neither a zip archive nor a pickle"
        raise CorruptCheckpointError(f"{path} is not a torch.save file ({reason}); {_ACCEPTED}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class SafetensorsSource(Source):
    """One ``.safetensors`` file, or a directory of shards with ``model.safetensors.index.json``."""

    format = "safetensors"

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.uri = path
        if os.path.isdir(path):
            index_path = os.path.join(path, stf.INDEX)
            weight_map = index_weight_map(index_path) if os.path.exists(index_path) else {}
            files = list(dict.fromkeys(weight_map.values())) if weight_map else [stf.SINGLE]
            paths = [os.path.join(path, name) for name in files]
        else:
            paths, weight_map = [path], {}
        self.paths = paths
        self._handles: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self.specs = {}
        self.user_metadata = {}
        self._file_of: dict[str, str] = {}
        for file in paths:
            try:
                handle = safe_open(file, framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CorruptCheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
            self._handles[file] = handle
            self._locks[file] = threading.Lock()
            meta = handle.metadata() or {}
            self.user_metadata.update({k: v for k, v in meta.items() if k != "format"})
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                view = handle.get_slice(key)
                if key in self._file_of:  # which one is meant? (Hugging Face's loader takes the last)
                    raise CorruptCheckpointError(
                        f"{path}: tensor {key!r} is stored twice, in {self._file_of[key]} and {file}"
                    )
                dtype = stf.torch_dtype(view.get_dtype(), key=key, file=file)
                self.specs[key] = TensorSpec(dtype, tuple(view.get_shape()))
                self._file_of[key] = file
        lost = [key for key in weight_map if key not in self._file_of]
        if lost:  # a shard of another version, or cut short: the conversion would lack them
            raise CorruptCheckpointError(
                f"{index_path} names {len(lost)} tensor(s) that no shard holds, e.g. {lost[0]!r} "
                f"in {weight_map[lost[0]]}"
            )

    def read_tensor(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        with self._locks[file]:
            tensor: torch.Tensor = self._handles[file].get_tensor(key)
            return tensor

    def read_object(self, key: str) -> Any:
        raise KeyError(key)  # safetensors holds tensors only

    def close(self) -> None:
        self._handles.clear()


def index_shards(index_path: str) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` lists, each a plain file
    name in its folder (CorruptCheckpointError naming the index otherwise)."""
    return list(dict.fromkeys(index_weight_map(index_path).values()))


def index_weight_map(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (tensor name -> shard), each
    shard a plain file name in its folder (CorruptCheckpointError naming the index otherwise)."""
    try:
        with open(index_path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MANIFEST_MAX_BYTES:  # a sparse 8 GB file, say
                raise too_large(index_path, MANIFEST_MAX_BYTES)
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{index_path} is not a JSON document: {exc}") from exc
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(
            f"{index_path} has no weight_map (an object mapping each tensor name to its shard file)"
        )
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise CorruptCheckpointError(
                f"{index_path}: shard {name!r} is not a plain file name in the index's folder"
            )
    return weight_map


def local_path(uri: str) -> str | None:
    """The local path a plain path or ``file://`` URI names; None for other schemes."""
    if scheme_of(uri) != "file":
        return None
    if uri.startswith("file://"):
        return unquote(uri[len("file://") :])
    return os.path.expanduser(uri)


def local_folder(store: ByteStore) -> str | None:
    """The local directory ``store``'s location is, where its files are local ones; else None.
    Through wrappers, one that transforms bytes too (a link, or a file in the way, is the
    location's, not its bytes'), and for fsspec's local filesystem (``fsspec+file://``),
    whose files are local ones though it maps none."""
    while isinstance(store, ForwardingByteStore):
        store = store.inner
    inside = store.local_path(MANIFEST)
    if inside is not None:
        return os.path.dirname(inside)
    protocol = getattr(getattr(store, "fs", None), "protocol", ())  # an FsspecStore's filesystem
    path = getattr(store, "path", None)
    local = "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))
    return path.rstrip("/") or "/" if local and isinstance(path, str) else None


def file_in_the_way(backend: Backend, uri: str) -> str | None:
    """The local file that the location ``uri`` is, or lies under (``notes.txt``,
    ``notes.txt/x``), where no checkpoint can be; None when there is none (or the store's
    files are not local ones)."""
    if not isinstance(backend, StoreBackend):
        return None
    path = local_folder(backend.open_store(uri))
    return None if path is None else file_at_or_above(path)


def file_at_or_above(path: str) -> str | None:
    """The file (not a directory) that the local ``path`` is, or lies under; else None."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path if os.path.lexists(path) and not os.path.isdir(path) else None


def is_safetensors(path: str) -> bool:
    """Whether the local directory ``path`` holds safetensors shards (an index, or a
    single ``model.safetensors`` and no torchstow manifest)."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return stf.INDEX in names or (stf.SINGLE in names and MANIFEST not in names)


def is_dcp(names: Collection[str]) -> bool:
    """Whether a location holding ``names`` is a DCP checkpoint (and not a torchstow one)."""
    return DCP_METADATA in names and MANIFEST not in names


class DcpSource(TorchstowSource):
    """A checkpoint in DCP's own format (``.metadata`` and ``*.distcp``), read by its
    backend's reader (:mod:`torchstow.format.dcp_metadata` decodes the metadata with its
    restricted unpickler). DCP writes no checksums."""

    format = "dcp"


def dcp_source(uri: str, storage_options: dict[str, Any] | None) -> Source:
    """The source for the DCP-format checkpoint at ``uri`` (its backend reads either format)."""
    return DcpSource(uri, storage_options)


def checkpoint_file_note(path: str) -> str | None:
    """Where the local file ``path`` is one of a checkpoint's own files (its ``manifest.json``
    or DCP's ``.metadata``, a data file or chunk table torchstow writes, a ``.distcp``), a note
    that the checkpoint is its folder; else None."""
    name = os.path.basename(path)
    if name in (MANIFEST, DCP_METADATA):
        what = f"the {name}"
    elif is_checkpoint_file(name) or name.endswith(".distcp"):
        what = "a file"
    else:
        return None
    return f"{path} is {what} of the checkpoint {os.path.dirname(path) or '.'}: give the folder"


def open_source(uri: str, storage_options: dict[str, Any] | None = None) -> Source:
    """Detect the format of the checkpoint at ``uri`` and open it.

    ``torch.save`` and safetensors sources are local files; torchstow and
    DCP checkpoints may be on any backend.
    """
    path = local_path(uri)
    if path is not None and os.path.isfile(path):
        note = checkpoint_file_note(path)
        if note is not None:  # no torch.save file: the checkpoint is its folder
            raise CheckpointNotFoundError(f"no checkpoint at {uri}: {note}")
        if path.endswith(".safetensors"):
            return SafetensorsSource(path)
        return TorchSaveSource(path)
    if path is not None and is_safetensors(path):
        return SafetensorsSource(path)
    backend = default_registry().backend_for(uri, storage_options)
    if isinstance(backend, StoreBackend) and is_dcp(backend.open_store(uri).list_files()):
        return dcp_source(uri, storage_options)
    try:
        return TorchstowSource(uri, storage_options)
    except CheckpointNotFoundError:
        if path is not None and not os.path.exists(path):
            raise CheckpointNotFoundError(f"nothing at {uri}") from None
        raise
