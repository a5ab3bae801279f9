"""Validation at the door: one pass over a decoded manifest before anything acts on it.

A manifest may come from anyone (a downloaded checkpoint, a damaged disk, a
hostile peer). :func:`check_manifest` checks the raw JSON document against
the rules of ``docs/format.md`` - the type and range of every field, plain
data-file names, locations whose length matches the elements they hold,
chunks that tile each tensor exactly once, structure records that map each
key once - and :func:`check_extents` checks every location against the sizes
of the files present, before a single byte is allocated for it. The codec
(:mod:`torchstow.format.codec`) runs :func:`check_manifest` on every manifest
it decodes. Each failure is a :class:`CorruptCheckpointError` naming the
manifest (or file) and the key.
The cost is linear in the manifest, apart from the overlap test of tensors
stored in several chunks (a sweep over their chunks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from torchstow.errors import CorruptCheckpointError
from torchstow.format.manifest import dtype_from_name
from torchstow.format.structure import leaf_paths

__all__ = ["MAX_DEPTH", "check_extents", "check_manifest", "is_plain_data_name", "missing_file_error"]

MAX_DIMS = 64
MAX_DEPTH = 200  # nesting of JSON values (user metadata, inline objects, planner data)
_MAX_INT = (1 << 63) - 1
_ENCODINGS = ("json", "torch", "pickle")
_KINDS = ("dict", "list", "tuple")
_LOCATION_KEYS = ("file", "offset", "length", "crc32c")


class _RuleError(Exception):
    """A rule the manifest breaks; turned into CorruptCheckpointError with its place."""


def is_plain_data_name(name: object) -> bool:
    """Whether ``name`` is a data-file name that stays inside its checkpoint:
    ``data-*.bin``, no path separator, no NUL, not hidden."""
    return (
        type(name) is str
        and name.startswith("data-")
        and name.endswith(".bin")
        and len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _int(value: Any, what: str, low: int = 0, high: int = _MAX_INT) -> int:
    if type(value) is not int:
        raise _RuleError(f"{what} is {type(value).__name__} {_short(value)}, not an integer")
    if not low <= value <= high:
        raise _RuleError(f"{what} is {_short(value)}, outside {low}..{high}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ints(value: Any, what: str, length: int | None = None) -> list[int]:
    if type(value) is not list:
        raise _RuleError(f"{what} is {type(value).__name__}, not a list of integers")
    if length is not None and len(value) != length:
        raise _RuleError(f"{what} has {len(value)} numbers, the shape {length}")
    return [_int(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether a JSON value nests at most ``limit`` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        if type(node) is dict:
            stack.extend((v, depth + 1) for v in node.values())
        elif type(node) is list:
            stack.extend((v, depth + 1) for v in node)
    return True


def check_manifest(doc: Any) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``doc`` (the manifest's JSON,
    decoded to built-in types) is a well-formed version-1 manifest. The message
    names the entry (key) or field and the rule; the decoder adds the manifest's name."""
    where = "the manifest"
    try:
        if type(doc) is not dict:
            raise _RuleError(f"is {type(doc).__name__}, not an object")
        if not _depth_ok(doc, MAX_DEPTH):
            raise _RuleError(f"JSON nests deeper than {MAX_DEPTH} levels")
        for name, kind in (("torch_version", str), ("user_metadata", dict), ("checksum", dict)):
            if doc.get(name) is not None and type(doc[name]) is not kind:
                raise _RuleError(f"{name!r} is {type(doc[name]).__name__}, not {kind.__name__}")
        committed = doc.get("committed_at")
        if committed is not None and (type(committed) not in (int, float) or not math.isfinite(committed)):
            raise _RuleError(f"'committed_at' is {_short(committed)}, not a time")
        if doc.get("save_id") is not None and type(doc["save_id"]) is not str:
            raise _RuleError("'save_id' is not a string")
        block_size = _int((doc.get("checksum") or {}).get("block_size", 0), "checksum.block_size")
        files = doc.get("files", [])
        if type(files) is not list:
            raise _RuleError(f"'files' is {type(files).__name__}, not a list")
        for i, name in enumerate(files):
            if not is_plain_data_name(name):
                raise _RuleError(
                    f"files[{i}] = {_short(name)} is not a plain data-file name inside the checkpoint"
                )
        if len(set(files)) != len(files):
            raise _RuleError("'files' names a file twice")
        entries = doc.get("entries")
        if type(entries) is not dict:
            raise _RuleError(f"'entries' is {type(entries).__name__}, not an object")
        for fqn, raw in entries.items():
            where = f"entries[{fqn!r}]"
            _check_entry(raw, len(files), block_size)
        where = "planner_data"
        _check_structure(doc.get("planner_data"), entries)
    except _RuleError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def _check_entry(raw: Any, nfiles: int, block_size: int) -> None:
    if type(raw) is not dict:
        raise _RuleError(f"is {type(raw).__name__}, not an object")
    if "dtype" not in raw:
        encoding = raw.get("encoding")
        if encoding not in _ENCODINGS:
            raise _RuleError(f"unknown object encoding {_short(encoding)} (known: {', '.join(_ENCODINGS)})")
        if encoding != "json" and "file" in raw:  # a JSON value is inline (absent means null)
            _check_location(raw, nfiles, block_size, None, "")
        return
    if type(raw["dtype"]) is not str:
        raise _RuleError("'dtype' is not a string")
    try:
        dtype = dtype_from_name(raw["dtype"])
    except CorruptCheckpointError as exc:
        raise _RuleError(str(exc)) from None
    if type(raw.get("requires_grad", False)) is not bool:
        raise _RuleError("'requires_grad' is not true or false")
    shape = _ints(raw.get("shape"), "'shape'")
    if len(shape) > MAX_DIMS:
        raise _RuleError(f"'shape' has {len(shape)} dimensions, more than {MAX_DIMS}")
    numel = 1
    for size in shape:
        numel *= size
        if numel * dtype.itemsize > _MAX_INT:
            raise _RuleError(f"shape {_short(shape)} holds more than 2**63 bytes")
    chunks = raw.get("chunks")
    if chunks is None:
        if "file" in raw:
            _check_location(raw, nfiles, block_size, numel * dtype.itemsize, "")
        return
    if type(chunks) is not list:
        raise _RuleError(f"'chunks' is {type(chunks).__name__}, not a list")
    boxes = []
    for i, chunk in enumerate(chunks):
        what = f"chunks[{i}]"
        if type(chunk) is not dict:
            raise _RuleError(f"{what} is {type(chunk).__name__}, not an object")
        offsets = _ints(chunk.get("offsets"), f"{what}.offsets", len(shape))
        sizes = _ints(chunk.get("sizes"), f"{what}.sizes", len(shape))
        for dim, (offset, size, full) in enumerate(zip(offsets, sizes, shape, strict=True)):
            if offset + size > full:
                raise _RuleError(
                    f"{what} reaches {offset + size} in dimension {dim}, beyond the shape's {full}"
                )
        count = math.prod(sizes)
        if "file" in chunk:
            _check_location(chunk, nfiles, block_size, count * dtype.itemsize, f"{what}.")
        boxes.append((offsets, sizes, count))
    _check_tiling(shape, numel, boxes)


def _check_location(raw: dict[str, Any], nfiles: int, block_size: int, nbytes: int | None, what: str) -> None:
    for key in _LOCATION_KEYS:
        if key not in raw:
            raise _RuleError(f"{what}{key} is missing")
    _int(raw["file"], f"{what}file", 0, nfiles - 1)
    _int(raw["offset"], f"{what}offset")
    length = _int(raw["length"], f"{what}length")
    if nbytes is not None and length != nbytes:
        raise _RuleError(f"{what}length is {length} bytes, but its elements take {nbytes}")
    block = _int(raw.get("block", block_size), f"{what}block")
    crcs = raw["crc32c"]
    if type(crcs) is not list:
        raise _RuleError(f"{what}crc32c is {type(crcs).__name__}, not a list")
    if length and not block:
        raise _RuleError(f"{what}: {length} bytes with a checksum block size of 0")
    expected = -(-length // block) if length else 0
    if len(crcs) != expected:
        raise _RuleError(f"{what}crc32c has {len(crcs)} checksums; {length} bytes need {expected}")
    for i, crc in enumerate(crcs):
        _int(crc, f"{what}crc32c[{i}]", 0, 0xFFFFFFFF)


def _check_tiling(shape: list[int], numel: int, boxes: list[tuple[list[int], list[int], int]]) -> None:
    """Chunks (already inside the shape) cover every element exactly once."""
    covered = sum(count for _, _, count in boxes)
    if covered != numel:
        raise _RuleError(f"the chunks cover {covered} elements of the {numel} in shape {_short(shape)}")
    solid = [b for b in boxes if b[2]]
    if len(solid) < 2:
        return
    # Equal volumes and no two chunks overlapping mean an exact tiling. Sweep
    # along the dimension where chunks start at the most places, so only
    # chunks sharing a band there are compared.
    dim = max(range(len(shape)), key=lambda d: len({b[0][d] for b in solid}))
    solid.sort(key=lambda b: b[0][dim])
    active: list[tuple[list[int], list[int], int]] = []
    for box in solid:
        start = box[0][dim]
        active = [a for a in active if a[0][dim] + a[1][dim] > start]
        for other in active:
            if all(
                o1 < o2 + s2 and o2 < o1 + s1
                for o1, s1, o2, s2 in zip(box[0], box[1], other[0], other[1], strict=True)
            ):
                raise _RuleError(f"chunks at {other[0]} and {box[0]} overlap")
        active.append(box)


def _path(value: Any, what: str) -> tuple[str | int, ...]:
    if type(value) is not list or not all(type(p) in (str, int) for p in value):
        raise _RuleError(f"{what} is {_short(value)}, not a list of keys and indices")
    return tuple(value)


def _check_structure(planner_data: Any, entries: Mapping[str, Any]) -> None:
    """The structure records rebuild the nesting with each key at its own place."""
    if planner_data is None:
        return
    if type(planner_data) is not dict:
        raise _RuleError(f"is {type(planner_data).__name__}, not an object")
    containers = planner_data.get("containers", [])
    odd = planner_data.get("paths", {})
    if type(containers) is not list or type(odd) is not dict:
        raise _RuleError("'containers' must be a list and 'paths' an object")
    kinds: dict[tuple[str | int, ...], str] = {}
    for i, record in enumerate(containers):
        if type(record) is not list or len(record) != 3 or record[1] not in _KINDS:
            raise _RuleError(f"containers[{i}] is {_short(record)}, not [path, kind, position]")
        path = _path(record[0], f"containers[{i}] path")
        _int(record[2], f"containers[{i}] position")
        if path in kinds:
            raise _RuleError(f"container {_short(list(path))} is recorded twice")
        kinds[path] = record[1]
    for fqn, path in odd.items():
        _path(path, f"paths[{fqn!r}]")
        if not path:
            raise _RuleError(f"paths[{fqn!r}] is empty")
    try:
        paths = leaf_paths(planner_data, entries)
    except ValueError as exc:  # a dotted key with a non-integer index under a list
        raise _RuleError(f"a key does not fit the recorded containers ({exc})") from None
    _check_paths(paths, kinds)


def _check_paths(
    paths: Mapping[str, tuple[str | int, ...]], kinds: Mapping[tuple[str | int, ...], str]
) -> None:
    owner: dict[tuple[str | int, ...], str] = {}
    for fqn, path in paths.items():
        if path in owner:
            raise _RuleError(
                f"keys {owner[path]!r} and {fqn!r} are recorded at the same place {_short(list(path))}"
            )
        if path in kinds:
            raise _RuleError(f"key {fqn!r} is recorded where a container is")
        owner[path] = fqn
    for fqn, path in paths.items():
        for depth in range(1, len(path)):
            if path[:depth] in owner:
                raise _RuleError(f"key {fqn!r} is recorded inside key {owner[path[:depth]]!r}")
        parent = kinds.get(path[:-1])
        if parent in ("list", "tuple") and (type(path[-1]) is not int or path[-1] < 0):
            raise _RuleError(f"key {fqn!r} is recorded in a {parent} at index {_short(path[-1])}")


def check_extents(locations: Iterable[tuple[Any, Any]], sizes: Mapping[str, int], location: str) -> set[str]:
    """Every ``(index, StorageInfo)`` in a file that is present lies inside it.

    ``sizes`` maps the checkpoint's file names to their sizes in bytes. Runs
    before anything is allocated for the data, so no claim in the manifest
    allocates more than the files hold. Returns the names of the listed files
    that are missing: reading an item in one of them is an error, but items
    elsewhere (and inline values) stay readable.
    """
    missing = set()
    for index, info in locations:
        size = sizes.get(info.relative_path)
        if size is None:
            missing.add(info.relative_path)
        elif info.offset + info.length > size:
            key = getattr(index, "fqn", index)
            raise CorruptCheckpointError(
                f"{location}/{info.relative_path} is {size} bytes, but the manifest places {key!r} at bytes "
                f"{info.offset}..{info.offset + info.length}: the file is truncated or the manifest is wrong"
            )
    return missing


def missing_file_error(location: str, name: str, key: str) -> CorruptCheckpointError:
    """The error for reading ``key`` from a listed file that is not there."""
    return CorruptCheckpointError(
        f"{location}/{name} is missing, though the committed manifest lists it "
        f"(it holds {key!r}): the checkpoint is damaged"
    )
