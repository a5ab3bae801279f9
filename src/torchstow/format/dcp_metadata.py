"""DCP's own ``.metadata`` file (``dcp.save``'s manifest), read as a torchstow manifest.

DCP pickles its ``.metadata``. It is decoded here by a restricted unpickler
that admits only DCP's metadata classes and torch's size, dtype, layout and
memory-format types (plus the path class DCP records the checkpoint id
with): any other reference is a :class:`CorruptCheckpointError` and nothing
in the file is executed. The decoded entries are translated to torchstow's
(:func:`ts_metadata_entries` and friends) and checked by the format's own rules;
their data locations are :class:`DcpLocations`, which mark the manifest as
DCP's for the reader (each chunk is a ``torch.save`` blob, no checksums).
``torch.distributed.checkpoint`` (a heavy import) is imported on first use.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from torchstow.errors import CorruptCheckpointError, FormatVersionError
from torchstow.format.files import DCP_METADATA
from torchstow.format.leaves import PICKLE, TORCH
from torchstow.format.manifest import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    EncodedLocations,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.format.structure import DICT, LIST, MAX_KEY_DEPTH
from torchstow.format.validation import check_decoded

if TYPE_CHECKING:
    from torch.distributed.checkpoint import metadata as dcp_md

__all__ = [
    "DcpLocations",
    "decode_dcp_metadata",
    "object_encoding",
    "planner_data_from_mappings",
    "ts_index",
    "ts_metadata_entries",
    "ts_props",
    "ts_tensor_entry",
]


def ts_index(index: dcp_md.MetadataIndex) -> MetadataIndex:
    """A DCP MetadataIndex as torchstow's."""
    return MetadataIndex(index.fqn, index.offset, index.index)


def ts_props(props: dcp_md.TensorProperties) -> TensorProperties:
    """DCP's TensorProperties as torchstow's."""
    return TensorProperties(
        props.dtype, props.requires_grad, props.layout, props.memory_format, props.pin_memory
    )


def ts_tensor_entry(entry: dcp_md.TensorStorageMetadata) -> TensorStorageMetadata:
    """A DCP tensor entry as torchstow's."""
    chunks = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in entry.chunks]
    return TensorStorageMetadata(ts_props(entry.properties), torch.Size(entry.size), chunks)


def ts_metadata_entries(
    entries: Mapping[str, Any], encodings: Mapping[str, str] | None = None
) -> dict[str, STORAGE_TYPES]:
    """DCP's ``state_dict_metadata`` as torchstow's; byte entries take their
    encoding from ``encodings`` (default: bytes read back with ``torch.load(weights_only=True)``)."""
    from torch.distributed.checkpoint import metadata as dcp_md

    out: dict[str, STORAGE_TYPES] = {}
    for fqn, entry in entries.items():
        if isinstance(entry, dcp_md.TensorStorageMetadata):
            out[fqn] = ts_tensor_entry(entry)
        else:
            out[fqn] = BytesStorageMetadata((encodings or {}).get(fqn, TORCH))
    return out


def planner_data_from_mappings(mappings: Any, fqns: Any) -> dict[str, Any]:
    """torchstow's recorded structure from DCP's ``fqn -> path`` mappings.

    A container is a list when the keys under it are integers, else a dict;
    keys without a mapping are top-level. A path that is not a sequence of
    strings and integers is a ValueError (before anything hashes it).
    """
    paths: dict[str, list[Any]] = {}
    kinds: dict[tuple[Any, ...], str] = {(): DICT}
    for fqn in fqns:
        path = mappings.get(fqn, (fqn,)) if isinstance(mappings, Mapping) else (fqn,)
        if not isinstance(path, tuple | list) or not all(type(p) in (str, int) for p in path):
            raise ValueError(f"the planner_data path of {fqn!r} is not a sequence of keys and indices")
        if len(path) > MAX_KEY_DEPTH:  # before its prefixes are made (quadratic in its length)
            raise ValueError(
                f"the planner_data path of {fqn!r} has {len(path)} parts, more than {MAX_KEY_DEPTH}"
            )
        path = tuple(path)
        paths[fqn] = list(path)
        for depth in range(1, len(path)):
            kinds.setdefault(path[:depth], LIST if isinstance(path[depth], int) else DICT)
    containers = [[list(path), kind, 0] for path, kind in kinds.items()]
    return {"containers": containers, "paths": paths}


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

    try:
        md = _RestrictedUnpickler(data).load()
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{source} is not DCP metadata torchstow can read safely: {exc}"
        ) from exc
    # getattr: a pickle builds an object with the fields it names, whichever they are
    if not isinstance(md, dcp_md.Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CorruptCheckpointError(f"{source} does not hold DCP Metadata (found {type(md).__name__})")
    entry_types = (dcp_md.TensorStorageMetadata, dcp_md.BytesStorageMetadata)
    locations = getattr(md, "storage_data", None)
    if not isinstance(locations, dict):
        raise CorruptCheckpointError(f"{source} records no data locations")
    try:
        if not all(
            isinstance(k, str) and isinstance(v, entry_types) for k, v in md.state_dict_metadata.items()
        ):
            raise TypeError("an entry is not tensor or bytes metadata")
        entries = ts_metadata_entries(md.state_dict_metadata)
        found: dict[MetadataIndex, StorageInfo] = {}
        for index, info in locations.items():
            if not isinstance(index, dcp_md.MetadataIndex) or not isinstance(info, _StorageInfo):
                raise TypeError(f"a data location is a {type(info).__name__}")
            if type(index.fqn) is not str or type(info.relative_path) is not str:
                raise TypeError(  # named by type only: a hostile value may be costly to print
                    f"a data location has a {type(index.fqn).__name__} key and a "
                    f"{type(info.relative_path).__name__} file name, not strings"
                )
            if type(info.offset) is not int or type(info.length) is not int:  # not inf, nor 1.5
                raise TypeError(
                    f"the data location of {index.fqn!r} has a {type(info.offset).__name__} offset and "
                    f"a {type(info.length).__name__} length, not integers"
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
            found[ts_index(index)] = StorageInfo(info.relative_path, info.offset, info.length)
        planner_data = planner_data_from_mappings(md.planner_data, entries)
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
        state_dict_metadata=entries, planner_data=planner_data, storage_data=DcpLocations(found), version=0
    )


class DcpLocations(EncodedLocations):
    """The data locations of a DCP-format checkpoint (they mark its manifest as such)."""


def object_encoding(metadata: Metadata, encoding: str, *, allow_pickle: bool) -> str:
    """The encoding to read an object of ``metadata`` stored as ``encoding`` with.

    DCP's own format records no encoding and DCP unpickles every object it stored:
    with ``allow_pickle`` such an object is read as ``pickle``.
    """
    if allow_pickle and encoding == TORCH and isinstance(metadata.storage_data, DcpLocations):
        return PICKLE
    return encoding
