"""Which parts of a checkpoint a partial read asks for, as PyTorch's checkpoint reader reads them.

A state dict handed to :meth:`~torchstow.checkpointing.CheckpointReader.read` names what
to read: a value is read where the checkpoint has one, and ``None`` at any
depth stands for "whatever the checkpoint holds here", a single value or a
whole subtree (a model's sub-dict, an optimizer's state). Keys the
checkpoint lacks are reported the way PyTorch's reader reports them: the
shallowest absent path, dict keys joined with ``.``, list and tuple
positions as ``[i]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torchstow.format.structure import LIST, TUPLE, Path, build_nested, flatten_state_dict, leaf_paths

__all__ = ["PartialRead", "plan_partial_read", "subtree"]


@dataclass
class PartialRead:
    """What to read for a state dict: stored keys to load, placeholders to expand, what is missing."""

    #: stored key -> the state dict's value for it (None: a new value is read)
    leaves: dict[str, Any] = field(default_factory=dict)
    #: the state dict's path of each of its own keys
    paths: dict[str, Path] = field(default_factory=dict)
    #: placeholder key -> the stored keys of the subtree it stands for
    subtrees: dict[str, list[str]] = field(default_factory=dict)
    #: absent paths, as PyTorch's reader names them
    missing: list[str] = field(default_factory=list)


def plan_partial_read(state_dict: Mapping[str, Any], stored: Iterable[str], planner_data: Any) -> PartialRead:
    """Match ``state_dict``'s keys against the ``stored`` keys of a checkpoint."""
    stored = list(stored)
    flat = flatten_state_dict(state_dict)
    kinds = {path: kind for path, kind, _ in flat.containers}
    stored_set = set(stored)
    out = PartialRead(paths=dict(flat.paths))
    children: dict[str, list[str]] | None = None
    missing: list[Path] = []
    for fqn, value in flat.leaves.items():
        if fqn in stored_set:
            out.leaves[fqn] = value
            continue
        if value is None:
            if children is None:
                children = _by_prefix(stored)
            under = children.get(fqn)
            if under:
                out.subtrees[fqn] = under
                for key in under:
                    out.leaves[key] = None
                continue
        missing.append(flat.paths[fqn])
    if missing:
        present = _prefixes(leaf_paths(planner_data, stored).values())
        seen: set[Path] = set()
        for path in missing:
            cut = next((path[: i + 1] for i in range(len(path)) if path[: i + 1] not in present), path)
            if cut not in seen:
                seen.add(cut)
                out.missing.append(_render(cut, kinds))
    return out


def _by_prefix(stored: list[str]) -> dict[str, list[str]]:
    """Every dotted prefix of the stored keys -> the stored keys under it, in stored order."""
    out: dict[str, list[str]] = {}
    for key in stored:
        parts = key.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), []).append(key)
    return out


def _prefixes(paths: Iterable[Path]) -> set[Path]:
    out: set[Path] = set()
    for path in paths:
        for i in range(1, len(path) + 1):
            out.add(path[:i])
    return out


def _render(path: Path, kinds: Mapping[Path, str]) -> str:
    text = ""
    for i, elem in enumerate(path):
        if kinds.get(path[:i]) in (LIST, TUPLE):
            text += f"[{elem}]"
        else:
            text = f"{text}.{elem}" if text else str(elem)
    return text


def subtree(values: Mapping[str, Any], under: list[str], planner_data: Any, path: Path) -> Any:
    """The nested value at ``path`` rebuilt from the loaded ``values`` of the keys ``under`` it."""
    node: Any = build_nested({key: values[key] for key in under}, planner_data, under)
    stored_path = leaf_paths(planner_data, under[:1])[under[0]][: len(path)]
    for elem in stored_path:
        node = node[elem]
    return node
