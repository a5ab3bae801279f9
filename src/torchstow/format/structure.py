"""Flattening nested state dicts to fully-qualified keys, and back.

Mappings are always walked; lists and tuples are walked only when they hold a
tensor somewhere inside, otherwise they are a single leaf (an optimizer's
``param_groups`` stays one JSON value). Keys are joined with ``"."``. Each
leaf's path (the dict keys and sequence indices leading to it) and the type of
every container are recorded, so the exact nesting - empty containers, tuples,
integer dict keys - can be rebuilt without the original object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any

import torch

from torchstow.format.leaves import is_utf8

PathElem = str | int
Path = tuple[PathElem, ...]

DICT = "dict"
LIST = "list"
TUPLE = "tuple"
MAX_KEY_DEPTH = 100
"""The most parts a key's path has (containers nest at most this deep less one): deeper
is refused on save and, in a manifest, on load (rebuilding it would recurse past Python's limit)."""

__all__ = [
    "MAX_KEY_DEPTH",
    "Flattened",
    "Path",
    "build_nested",
    "check_utf8_keys",
    "flatten_state_dict",
    "set_leaf",
]


class Flattened:
    """The result of :func:`flatten_state_dict`."""

    __slots__ = ("containers", "leaves", "paths")

    def __init__(self) -> None:
        self.leaves: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}
        # (path, kind, number of leaves seen before it): the position lets a
        # rebuild interleave containers and leaves in their original order.
        self.containers: list[tuple[Path, str, int]] = []

    def planner_data(self) -> dict[str, Any]:
        """The JSON form kept in the manifest: container types and unusual paths."""
        odd_paths = {
            fqn: list(path)
            for fqn, path in self.paths.items()
            if any(not isinstance(p, str) or "." in p for p in path)
        }
        return {
            "containers": [[list(path), kind, pos] for path, kind, pos in self.containers],
            "paths": odd_paths,
        }


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types: never a container


def _holds_tensor(seq: Iterable[Any]) -> bool:
    for item in seq:
        if isinstance(item, torch.Tensor):
            return True
        if isinstance(item, Mapping):
            if _holds_tensor(item.values()):
                return True
        elif isinstance(item, list | tuple) and _holds_tensor(item):
            return True
    return False


def _where(parent: Path) -> str:
    return ".".join(map(str, parent)) or "<root>"


def check_utf8_keys(keys: Iterable[str], where: str = "") -> None:
    """Raise ValueError for a key holding a lone surrogate (``"\\ud800"``), which the
    UTF-8 manifest cannot record; ``where`` names the container the keys are in."""
    for key in keys:
        if not is_utf8(key):
            under = f" under {where!r}" if where else ""
            raise ValueError(
                f"state dict key {key!r}{under} holds a lone surrogate, which the UTF-8 manifest "
                "cannot record; rename the key"
            )


def _check_key(key: object, parent: Path) -> PathElem:
    if isinstance(key, str):
        if not key.isascii():
            check_utf8_keys((key,), _where(parent))
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    where = _where(parent)
    raise ValueError(
        f"state dict key {key!r} under {where!r} has type {type(key).__name__}; "
        "torchstow keys must be str or int"
    )


def flatten_state_dict(state_dict: Mapping[str, Any]) -> Flattened:
    """Flatten ``state_dict`` to ``{fqn: leaf}`` with paths and container types."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"a state dict must be a mapping, got {type(state_dict).__name__}")
    out = Flattened()
    leaves = out.leaves
    paths = out.paths
    containers = out.containers
    stack: list[tuple[Path, str, Any]] = [((), "", state_dict)]
    while stack:
        path, fqn, node = stack.pop()
        plain_tensor = type(node) in _TENSOR_TYPES  # the common leaf, told apart cheaply
        if not plain_tensor and isinstance(node, Mapping):
            containers.append((path, DICT, len(leaves)))
            items: Iterable[tuple[Any, Any]] = node.items()
        elif not plain_tensor and path and isinstance(node, list | tuple) and _holds_tensor(node):
            containers.append((path, TUPLE if isinstance(node, tuple) else LIST, len(leaves)))
            items = enumerate(node)
        else:
            if fqn in leaves:
                raise ValueError(
                    f"two entries flatten to the key {fqn!r}: paths {paths[fqn]!r} and {path!r}; "
                    "rename one of them"
                )
            leaves[fqn] = node
            paths[fqn] = path
            continue
        if len(path) >= MAX_KEY_DEPTH:
            raise ValueError(
                f"the state dict nests deeper than {MAX_KEY_DEPTH} levels (under {_where(path[:3])!r}...); "
                "torchstow keeps at most that many"
            )
        children = []
        is_sequence = isinstance(node, list | tuple)
        for key, value in items:
            elem = key if is_sequence else _check_key(key, path)
            child_fqn = f"{fqn}.{elem}" if path else str(elem)
            children.append(((*path, elem), child_fqn, value))
        stack.extend(reversed(children))
    return out


def _decode_containers(planner_data: Mapping[str, Any] | None) -> list[tuple[Path, str, int]]:
    if not planner_data:
        return [((), DICT, 0)]
    return [(tuple(path), kind, pos) for path, kind, pos in planner_data.get("containers", [])]


def leaf_paths(planner_data: Mapping[str, Any] | None, fqns: Iterable[str]) -> dict[str, Path]:
    """Recover each key's path from the manifest's planner data."""
    odd = (planner_data or {}).get("paths", {})
    containers = {path: kind for path, kind, _ in _decode_containers(planner_data)}
    out: dict[str, Path] = {}
    for fqn in fqns:
        raw = odd.get(fqn)
        if raw is not None:
            out[fqn] = tuple(raw)
            continue
        # Ordinary keys: dotted string parts, ints where the parent is a sequence.
        parts: list[PathElem] = []
        for part in fqn.split("."):
            kind = containers.get(tuple(parts))
            parts.append(int(part) if kind in (LIST, TUPLE) else part)
        out[fqn] = tuple(parts)
    return out


def build_nested(
    leaves: Mapping[str, Any],
    planner_data: Mapping[str, Any] | None,
    all_fqns: Iterable[str] | None = None,
) -> dict[Any, Any]:
    """Rebuild the nested state dict from flat leaves and the recorded structure.

    ``all_fqns`` names every key of the checkpoint when ``leaves`` is a subset.
    A complete rebuild recreates empty containers too. In a subset, a sequence
    whose elements are not all present comes back as a dict keyed by index, so
    no index silently shifts.
    """
    containers = _decode_containers(planner_data)
    kinds = {path: kind for path, kind, _ in containers}
    order = list(leaves if all_fqns is None else all_fqns)
    all_paths = leaf_paths(planner_data, order)
    complete = len(all_paths) == len(leaves)
    lengths: dict[Path, int] = {}
    for path in chain(all_paths.values(), kinds):
        if path and kinds.get(path[:-1]) in (LIST, TUPLE):
            parent = path[:-1]
            lengths[parent] = max(lengths.get(parent, 0), int(path[-1]) + 1)

    root: dict[Any, Any] = {}
    nodes: dict[Path, dict[Any, Any]] = {(): root}

    def node_for(path: Path) -> dict[Any, Any]:
        node = nodes.get(path)
        if node is None:
            parent = node_for(path[:-1])
            node = parent[path[-1]] = {}
            nodes[path] = node
        return node

    # Walk leaves and containers in their original order, so keys keep it.
    pending = iter(sorted(containers, key=lambda c: c[2]) if complete else ())
    upcoming = next(pending, None)
    for position, fqn in enumerate(order):
        while upcoming is not None and upcoming[2] <= position:
            node_for(upcoming[0])
            upcoming = next(pending, None)
        if fqn in leaves:
            path = all_paths[fqn]
            node_for(path[:-1])[path[-1]] = leaves[fqn]
    while upcoming is not None:
        node_for(upcoming[0])
        upcoming = next(pending, None)
    # Convert sequences bottom-up (longest paths first) so parents see final children.
    for path in sorted(nodes, key=len, reverse=True):
        kind = kinds.get(path, DICT)
        node = nodes[path]
        if kind == DICT or not path or len(node) != lengths.get(path, 0):
            continue
        seq = [node[i] for i in range(len(node))]
        nodes[path[:-1]][path[-1]] = tuple(seq) if kind == TUPLE else seq
    return root


def set_leaf(root: Any, path: Path, value: Any) -> Any:
    """Replace the leaf at ``path`` inside ``root`` in place.

    Tuples on the way cannot be mutated, so they are rebuilt and put back into
    their (mutable) parent. Returns the possibly new root.
    """
    if not path:
        return value
    chain = [root]
    node = root
    for elem in path[:-1]:
        node = node[elem]
        chain.append(node)
    new_value = value
    for depth in range(len(path) - 1, -1, -1):
        parent = chain[depth]
        key = path[depth]
        if isinstance(parent, tuple):
            items = list(parent)
            items[int(key)] = new_value
            new_value = _rebuild_tuple(parent, items)
            continue
        parent[key] = new_value
        return root
    return new_value


def _rebuild_tuple(original: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    if hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    return type(original)(items)
