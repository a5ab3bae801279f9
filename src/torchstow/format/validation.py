"""Validation at the door: one pass over a decoded manifest before anything acts on it.

A manifest may come from anyone (a downloaded checkpoint, a damaged disk, a
hostile peer). The codec (:mod:`torchstow.format.codec`) decodes it into
typed structs, so every field already has its JSON type; :func:`check_manifest`
then checks what types cannot say, against the rules of ``docs/format.md``:
ranges, plain data-file names, locations whose length matches the elements
they hold, chunks that tile each tensor exactly once, structure records that
map each key once, bounded nesting of free-form values. :func:`check_extents`
checks every location against the sizes of the files present, before a
single byte is allocated for it. Each failure is a
:class:`CorruptCheckpointError` naming the entry (the key) and the rule.

The cost is linear in the manifest, apart from the overlap test of tensors
stored in several chunks in odd layouts (see
:func:`~torchstow.format.chunks.cover_fault`, the rule the planners check too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

from torchstow.errors import CorruptCheckpointError
from torchstow.format.chunks import Box, cover_fault, outside
from torchstow.format.compression import BYTEPLANES, CODECS, MAX_EXPANSION, expands_past
from torchstow.format.manifest import dtype_from_name
from torchstow.format.structure import MAX_KEY_DEPTH, leaf_paths
from torchstow.format.table import ChunkTable

__all__ = [
    "MAX_DEPTH",
    "MAX_DIMS",
    "RuleError",
    "check_decoded",
    "check_extents",
    "check_inside",
    "check_manifest",
    "check_tiling",
    "is_plain_data_name",
    "missing_file_error",
]

MAX_DIMS = 64
MAX_DEPTH = 100  # nesting of free-form JSON values (user metadata, inline objects)
_MAX_INT = (1 << 63) - 1
_MAX_CRC = 0xFFFFFFFF
_ENCODINGS = ("json", "torch", "pickle")
_KINDS = ("dict", "list", "tuple")

Path = tuple[str | int, ...]


class RuleError(Exception):
    """A rule the manifest breaks; turned into CorruptCheckpointError with its place."""


def is_plain_data_name(name: object) -> bool:
    """Whether ``name`` is a data-file name that stays inside its checkpoint:
    ``data-*.bin``, no path separator, no NUL, at most 255 characters."""
    return (
        type(name) is str
        and name.startswith("data-")
        and name.endswith(".bin")
        and len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(values: Sequence[int], what: str, high: int = _MAX_INT) -> None:
    """Every number in ``values`` lies in 0..high (checked in C, located only on failure)."""
    if values and (min(values) < 0 or max(values) > high):
        i, bad = next((i, v) for i, v in enumerate(values) if not 0 <= v <= high)
        raise RuleError(f"{what}[{i}] is {_short(bad)}, outside 0..{high}")


def _number(value: int, what: str, high: int = _MAX_INT) -> int:
    if not 0 <= value <= high:
        raise RuleError(f"{what} is {_short(value)}, outside 0..{high}")
    return value


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether a JSON value nests at most ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if type(node) is dict:
            if depth >= limit:
                return False
            stack.extend((v, depth + 1) for v in node.values() if type(v) in (dict, list))
        elif type(node) is list:
            if depth >= limit:
                return False
            stack.extend((v, depth + 1) for v in node if type(v) in (dict, list))
    return True


def check_manifest(
    *,
    files: list[str],
    block_size: int,
    entries: Mapping[str, Any],
    planner_data: Any,
    free_values: Iterable[tuple[str, Any]],
    checked: Container[str] = frozenset(),
) -> None:
    """Raise :class:`CorruptCheckpointError` unless a typed manifest keeps every rule.

    ``entries`` maps keys to the codec's typed entries; ``free_values`` names
    the fields holding free-form JSON (user metadata, custom storage data);
    ``checked`` names entries already shown to keep every rule of an entry
    (:func:`torchstow.format.bulk.chunked_entries_ok`), not checked again here.
    """
    where = "the manifest"
    key = None  # the entry being checked: named only if it fails
    try:
        for name, value in free_values:
            if not _depth_ok(value, MAX_DEPTH):
                raise RuleError(f"{name!r} nests deeper than {MAX_DEPTH} levels")
        _number(block_size, "checksum.block_size")
        for i, name in enumerate(files):
            if not is_plain_data_name(name):
                raise RuleError(
                    f"files[{i}] = {_short(name)} is not a plain data-file name inside the checkpoint"
                )
        if len(set(files)) != len(files):
            raise RuleError("'files' names a file twice")
        shapes: dict[tuple[str, tuple[int, ...]], int] = {}
        for key, raw in entries.items():  # the failing key names the error
            if key not in checked:
                _check_entry(raw, len(files), block_size, shapes)
        key = None
        where = "planner_data"
        _check_structure(planner_data, entries)
    except RuleError as exc:
        if key is not None:
            where = f"entries[{key!r}]"
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def _check_entry(
    raw: Any, nfiles: int, block_size: int, shapes: dict[tuple[str, tuple[int, ...]], int]
) -> None:
    """One entry's rules; ``shapes`` holds the byte size of each (dtype, shape) already checked."""
    if raw.dtype is None:
        if raw.encoding not in _ENCODINGS:
            raise RuleError(
                f"unknown object encoding {_short(raw.encoding)} (known: {', '.join(_ENCODINGS)})"
            )
        if raw.encoding == "json":
            if type(raw.value) in (dict, list) and not _depth_ok(raw.value, MAX_DEPTH):
                raise RuleError(f"the value nests deeper than {MAX_DEPTH} levels")
        elif raw.file is not None:
            _check_codec(raw.codec, None, "")
            _check_location(raw, nfiles, block_size, None, "")
        return
    shape = raw.shape
    nbytes = shapes.get((raw.dtype, tuple(shape))) if shape is not None else None
    if nbytes is None:
        nbytes = shapes[raw.dtype, tuple(shape)] = _check_shape(raw.dtype, shape)
    chunks = raw.chunks
    if chunks is None:
        if raw.file is not None:
            nbytes = _check_codec(raw.codec, raw.dtype, "", nbytes, raw.length)
            _check_location(raw, nfiles, block_size, nbytes, "")
        return
    itemsize = dtype_from_name(raw.dtype).itemsize
    boxes = []
    for i, chunk in enumerate(chunks):
        what = f"chunks[{i}]"
        count = check_inside(what, chunk.offsets, chunk.sizes, shape)
        if chunk.file is not None:
            raw_bytes = _check_codec(chunk.codec, raw.dtype, f"{what}.", count * itemsize, chunk.length)
            _check_location(chunk, nfiles, block_size, raw_bytes, f"{what}.")
        boxes.append((chunk.offsets, chunk.sizes, count))
    check_tiling(shape, boxes)


def _check_codec(
    codec: str | None, dtype: str | None, what: str, nbytes: int | None = None, stored: Any = None
) -> int | None:
    """A location's ``codec`` is one this torchstow decodes, and fits its entry (byte planes
    only for a tensor of several bytes per element, ``stored`` bytes that can hold its
    ``nbytes``: a few bytes claiming gigabytes are refused before anything is allocated for
    them); the length its location must then have (None for compressed bytes, whose length
    is theirs)."""
    if codec is None:
        return nbytes
    if codec not in CODECS:
        known = ", ".join(CODECS)
        raise RuleError(f"{what}codec {_short(codec)} is not one this torchstow knows (known: {known})")
    if codec == BYTEPLANES and (dtype is None or dtype_from_name(dtype).itemsize < 2):
        raise RuleError(f"{what}codec {codec!r} needs a tensor of several bytes per element")
    if nbytes is not None and type(stored) is int and stored >= 0 and bool(expands_past(nbytes, stored)):
        raise RuleError(
            f"{what}length is {stored} bytes, which no {codec!r} item expands to the {nbytes} its "
            f"elements take (at most {MAX_EXPANSION}x)"
        )
    return None


def _check_shape(dtype: str, shape: list[int] | None) -> int:
    """A tensor entry's dtype and shape are sane; the bytes its elements take."""
    try:
        itemsize = dtype_from_name(dtype).itemsize
    except CorruptCheckpointError as exc:
        raise RuleError(str(exc)) from None
    if shape is None:
        raise RuleError("a tensor entry without a 'shape'")
    if len(shape) > MAX_DIMS:
        raise RuleError(f"'shape' has {len(shape)} dimensions, more than {MAX_DIMS}")
    _range(shape, "'shape'")
    nbytes = math.prod(shape) * itemsize
    if nbytes > _MAX_INT:
        raise RuleError(f"shape {_short(shape)} holds more than 2**63 bytes")
    return nbytes


def _check_location(raw: Any, nfiles: int, block_size: int, nbytes: int | None, what: str) -> None:
    offset, length, crcs = raw.offset, raw.length, raw.crc32c
    block = block_size if raw.block is None else raw.block
    if (  # the common case, decided without a call per field
        offset is not None
        and length is not None
        and crcs is not None
        and 0 <= raw.file < nfiles
        and 0 <= offset <= _MAX_INT
        and 0 <= length <= _MAX_INT
        and (nbytes is None or length == nbytes)
        and 0 <= block <= _MAX_INT
        and ((block > 0 and len(crcs) == -(-length // block)) or (length == 0 and not crcs))
        and (not crcs or (min(crcs) >= 0 and max(crcs) <= _MAX_CRC))
    ):
        return
    for key in ("offset", "length", "crc32c"):
        if getattr(raw, key) is None:
            raise RuleError(f"{what}{key} is missing")
    _number(raw.file, f"{what}file", nfiles - 1)
    _number(raw.offset, f"{what}offset")
    length = _number(raw.length, f"{what}length")
    if nbytes is not None and length != nbytes:
        raise RuleError(f"{what}length is {length} bytes, but its elements take {nbytes}")
    block = _number(block_size if raw.block is None else raw.block, f"{what}block")
    if length and not block:
        raise RuleError(f"{what}: {length} bytes with a checksum block size of 0")
    expected = -(-length // block) if length else 0
    if len(raw.crc32c) != expected:
        raise RuleError(f"{what}crc32c has {len(raw.crc32c)} checksums; {length} bytes need {expected}")
    _range(raw.crc32c, f"{what}crc32c", _MAX_CRC)


def check_inside(what: str, offsets: Sequence[int], sizes: Sequence[int], shape: Sequence[int]) -> int:
    """A chunk (``what``: ``chunks[i]``) lies inside ``shape``: the readers' wording of
    :func:`~torchstow.format.chunks.outside`. Returns its number of elements."""
    dim = outside(offsets, sizes, shape)
    if dim is not None:
        if dim < 0:
            raise RuleError(
                f"{what} has {len(offsets)} offsets and {len(sizes)} sizes for {len(shape)} dimensions"
            )
        _range(offsets, f"{what}.offsets")
        _range(sizes, f"{what}.sizes")
        raise RuleError(
            f"{what} reaches {offsets[dim] + sizes[dim]} in dimension {dim}, beyond the shape's {shape[dim]}"
        )
    return math.prod(sizes)


def check_tiling(shape: Sequence[int], boxes: Sequence[Box]) -> None:
    """Chunks (already inside the shape) cover every element exactly once: the readers'
    wording of :func:`~torchstow.format.chunks.cover_fault`."""
    fault = cover_fault(shape, boxes)
    if fault is None:
        return
    if fault.overlapping is None:
        raise RuleError(
            f"the chunks cover {fault.covered} elements of the {fault.numel} in shape {_short(shape)}"
        )
    first, second = fault.overlapping
    raise RuleError(f"chunks at {first[0]} and {second[0]} overlap")


def _path(value: Any, what: str) -> Path:
    if type(value) is not list or not all(type(p) in (str, int) for p in value):
        raise RuleError(f"{what} is {_short(value)}, not a list of keys and indices")
    return tuple(value)


def _check_structure(planner_data: Any, entries: Mapping[str, Any]) -> None:
    """The structure records rebuild the nesting with each key at its own place."""
    if planner_data is None:  # every key is its dotted parts
        _check_dotted_depth(entries)
        return
    if type(planner_data) is not dict:
        raise RuleError(f"is {type(planner_data).__name__}, not an object")
    containers = planner_data.get("containers", [])
    odd = planner_data.get("paths", {})
    if type(containers) is not list or type(odd) is not dict:
        raise RuleError("'containers' must be a list and 'paths' an object")
    kinds: dict[Path, str] = {}
    for i, record in enumerate(containers):
        if (
            type(record) is not list
            or len(record) != 3
            or record[1] not in _KINDS
            or type(record[2]) is not int
        ):
            raise RuleError(f"containers[{i}] is {_short(record)}, not [path, kind, position]")
        path = _path(record[0], f"containers[{i}] path")
        if len(path) >= MAX_KEY_DEPTH:
            raise RuleError(f"containers[{i}] nests {len(path)} deep, more than {MAX_KEY_DEPTH - 1}")
        if path in kinds:
            raise RuleError(f"container {_short(list(path))} is recorded twice")
        kinds[path] = record[1]
    for fqn, path in odd.items():
        if not 0 < len(_path(path, f"paths[{fqn!r}]")) <= MAX_KEY_DEPTH:
            raise RuleError(f"paths[{fqn!r}] has {len(path)} parts, not 1 to {MAX_KEY_DEPTH}")
    _check_dotted_depth(fqn for fqn in entries if fqn not in odd)  # before splitting them
    if not odd and all(kind == "dict" for kind in kinds.values()):
        _check_dotted(entries, kinds)  # every key's path is its dotted parts: check on strings
        return
    try:
        paths = leaf_paths(planner_data, entries)
    except ValueError as exc:  # a dotted key with a non-integer index under a list
        raise RuleError(f"a key does not fit the recorded containers ({exc})") from None
    _check_paths(paths, kinds)


def _check_dotted_depth(keys: Iterable[str]) -> None:
    """Keys read as their dotted parts have at most :data:`MAX_KEY_DEPTH` of them."""
    for fqn in keys:
        if fqn.count(".") >= MAX_KEY_DEPTH:
            raise RuleError(f"key {_short(fqn)} has more than {MAX_KEY_DEPTH} dotted parts")


def _check_dotted(keys: Mapping[str, Any], kinds: Mapping[Path, str]) -> None:
    """:func:`_check_paths` for keys that are all plain dotted paths under dicts."""
    for path in kinds:
        parts = [p for p in path if type(p) is str and "." not in p]
        if path and len(parts) == len(path) and ".".join(parts) in keys:
            raise RuleError(f"key {'.'.join(parts)!r} is recorded where a container is")
    for fqn in keys:
        i = fqn.rfind(".")
        while i > 0:
            if fqn[:i] in keys:
                raise RuleError(f"key {fqn!r} is recorded inside key {fqn[:i]!r}")
            i = fqn.rfind(".", 0, i)


def _check_paths(paths: Mapping[str, Path], kinds: Mapping[Path, str]) -> None:
    owner: dict[Path, str] = {}
    for fqn, path in paths.items():
        other = owner.get(path)
        if other is not None:
            raise RuleError(f"keys {other!r} and {fqn!r} are recorded at the same place {_short(list(path))}")
        if path in kinds:
            raise RuleError(f"key {fqn!r} is recorded where a container is")
        owner[path] = fqn
    for fqn, path in paths.items():
        for depth in range(1, len(path)):
            if path[:depth] in owner:
                raise RuleError(f"key {fqn!r} is recorded inside key {owner[path[:depth]]!r}")
        parent = kinds.get(path[:-1])
        if parent in ("list", "tuple") and (type(path[-1]) is not int or path[-1] < 0):
            raise RuleError(f"key {fqn!r} is recorded in a {parent} at index {_short(path[-1])}")


def check_decoded(
    entries: Mapping[str, Any],
    locations: Mapping[Any, Any],
    min_bytes: Callable[[int, int], int] | None = None,
    planner_data: Any = None,
) -> None:
    """The rules a manifest decoded by another codec (DCP's ``.metadata``) must keep
    too: sane shapes, chunks that tile each tensor exactly once, plain file names,
    non-negative offsets and lengths, with ``min_bytes(elements, itemsize)`` no chunk
    stored in fewer bytes than that, and a ``planner_data`` (torchstow's form) that
    puts every key at its own place. Raises :class:`CorruptCheckpointError`."""
    where = "planner_data"
    needs: dict[tuple[str, tuple[int, ...]], int] = {}
    try:
        _check_structure(planner_data, entries)
        where = "the manifest"
        for fqn, entry in entries.items():
            where = f"entries[{fqn!r}]"
            shape = getattr(entry, "size", None)
            if shape is None:
                continue
            shape = list(shape)
            if len(shape) > MAX_DIMS:
                raise RuleError(f"'shape' has {len(shape)} dimensions, more than {MAX_DIMS}")
            _range(shape, "'shape'")
            boxes = []
            for i, chunk in enumerate(entry.chunks):
                offsets, sizes = list(chunk.offsets), list(chunk.sizes)
                boxes.append((offsets, sizes, check_inside(f"chunks[{i}]", offsets, sizes, shape)))
                if min_bytes is not None:
                    needs[fqn, tuple(offsets)] = min_bytes(boxes[-1][2], entry.properties.dtype.itemsize)
            check_tiling(shape, boxes)
        for index, info in locations.items():
            where = f"entries[{getattr(index, 'fqn', index)!r}]"
            name = info.relative_path
            if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
                raise RuleError(f"file name {_short(name)} is not a plain file name inside the checkpoint")
            _number(info.offset, "offset")
            _number(info.length, "length")
            need = needs.get((index.fqn, tuple(index.offset or ())))
            if need is not None and info.length < need:
                raise RuleError(f"{info.length} bytes cannot hold a chunk that takes {need}")
    except RuleError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def check_extents(
    locations: Iterable[tuple[Any, Any]],
    sizes: Mapping[str, int],
    location: str,
    beyond: dict[Any, str] | None = None,
) -> set[str]:
    """Every ``(index, StorageInfo)`` in a file that is present lies inside it.

    ``sizes`` maps the checkpoint's file names to their sizes in bytes. Runs
    before anything is allocated for the data, so no claim in the manifest
    allocates more than the files hold. Returns the names of the listed files
    that are missing: reading an item in one of them is an error, but items
    elsewhere (and inline values) stay readable. An item reaching past the end
    of its file raises CorruptCheckpointError, or, given ``beyond``, is recorded
    there (index -> the error's message, to raise when it is read), so the
    intact items of a truncated file stay readable too.
    """
    table = getattr(locations, "table", None)  # a version-2 manifest's columns: checked at once
    if isinstance(table, ChunkTable):
        missing, past = table.beyond(sizes)
        locations = map(table.pair, past)
    else:
        missing = set()
    for index, info in locations:
        size = sizes.get(info.relative_path)
        if size is None:
            missing.add(info.relative_path)
        elif info.offset + info.length > size:
            key = getattr(index, "fqn", index)
            message = (
                f"{location}/{info.relative_path} is {size} bytes, but the manifest places {key!r} at bytes "
                f"{info.offset}..{info.offset + info.length}: the file is truncated or the manifest is wrong"
            )
            if beyond is None:
                raise CorruptCheckpointError(message)
            beyond[index] = message
    return missing


def missing_file_error(location: str, name: str, key: str) -> CorruptCheckpointError:
    """The error for reading ``key`` from a listed file that is not there."""
    return CorruptCheckpointError(
        f"{location}/{name} is missing, though the committed manifest lists it "
        f"(it holds {key!r}): the checkpoint is damaged"
    )
