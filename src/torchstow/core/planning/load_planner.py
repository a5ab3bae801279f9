"""The default load planner: checks the state dict against the manifest, then plans reads
that intersect the chunks a rank holds with the stored chunks (any world size, any placement)."""

from __future__ import annotations

import bisect
import io
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from torchstow.core.dtensors import materialize
from torchstow.core.planning.aliases import AliasTracker
from torchstow.core.planning.geometry import is_raw_tensor, local_chunks
from torchstow.core.planning.items import LoadItemType, LoadPlan, ReadItem
from torchstow.core.planning.mismatch import mismatch_message
from torchstow.core.planning.planners import LoadPlanner
from torchstow.errors import CorruptCheckpointError, PickleNotAllowedError, StateDictMismatchError
from torchstow.format import chunks as chunk_math
from torchstow.format.dcp_metadata import DcpLocations, object_encoding
from torchstow.format.leaves import JSON, TORCH, check_unpickling_allowed, decode_object
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
    dtype_name,
)
from torchstow.format.structure import Flattened, Path, flatten_state_dict, set_leaf

__all__ = ["DefaultLoadPlanner"]

_ZEROS: dict[int, torch.Size] = {}  # torch.Size((0,) * ndim), shared (immutable)


def _zeros(ndim: int) -> torch.Size:
    zeros = _ZEROS.get(ndim)
    if zeros is None:
        zeros = _ZEROS[ndim] = torch.Size((0,) * ndim)
    return zeros


def _read_items_for(
    fqn: str, dest_index: MetadataIndex, dest: ChunkStorageMetadata, stored: Sequence[ChunkStorageMetadata]
) -> list[ReadItem]:
    """Read items that fill ``dest`` (a chunk this rank holds) from the stored chunks."""
    items = []
    for i, chunk in enumerate(stored):
        if chunk.offsets == dest.offsets and chunk.sizes == dest.sizes:
            zeros = _zeros(len(dest.sizes))
            storage_index = MetadataIndex(fqn, chunk.offsets, i)
            return [ReadItem(LoadItemType.TENSOR, dest_index, zeros, storage_index, zeros, dest.sizes)]
        hit = chunk_math.overlap(dest, chunk)
        if hit is not None:
            dest_offsets, storage_offsets, lengths = hit
            storage_index = MetadataIndex(fqn, chunk.offsets, i)
            items.append(
                ReadItem(
                    LoadItemType.TENSOR, dest_index, dest_offsets, storage_index, storage_offsets, lengths
                )
            )
    return items


def _split_as_stored(flat: Flattened, stored: Mapping[str, Any], below: _StoredBelow) -> list[str]:
    """Split leaves of ``flat`` that the checkpoint stores as finer keys, in place.

    torchstow keeps a list or tuple without tensors (an optimizer's
    ``param_groups``) as one leaf; DCP stores ``param_groups.0.lr`` and so
    on. Such a leaf is walked down to the keys the checkpoint has, so each
    value is loaded where it belongs; what the checkpoint lacks below it is
    then missing, as any other key. Returns the keys of the empty lists, tuples
    and dicts met so (which hold nothing of what the checkpoint stores below them).
    """
    if not any(fqn not in stored and below.has(fqn) for fqn in flat.leaves):
        return []
    leaves: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    empty: list[str] = []
    for fqn, value in flat.leaves.items():
        _split(fqn, flat.paths[fqn], value, stored, below, leaves, paths, empty)
    flat.leaves = leaves
    flat.paths = paths
    return empty


def _split(
    fqn: str,
    path: Path,
    value: Any,
    stored: Mapping[str, Any],
    below: _StoredBelow,
    leaves: dict[str, Any],
    paths: dict[str, Path],
    empty: list[str],
) -> None:
    if fqn in stored or not below.has(fqn) or not isinstance(value, Mapping | list | tuple):
        leaves[fqn] = value
        paths[fqn] = path
        return
    if not value:
        empty.append(fqn)
    children = enumerate(value) if isinstance(value, list | tuple) else value.items()
    for key, child in children:
        _split(f"{fqn}.{key}", (*path, key), child, stored, below, leaves, paths, empty)


class _StoredBelow:
    """The stored keys below a key (``key.…``): found by bisection in the keys, sorted
    on first use (only loads whose state dict lacks a key, or holds an empty container)."""

    def __init__(self, stored: Mapping[str, Any]) -> None:
        self._stored = stored
        self._sorted: list[str] | None = None

    def _span(self, fqn: str) -> tuple[list[str], int, int]:
        """The sorted keys, and where the ones below ``fqn`` start and end in them."""
        if self._sorted is None:
            self._sorted = sorted(self._stored)
        keys = self._sorted
        start = bisect.bisect_left(keys, f"{fqn}.")
        return keys, start, bisect.bisect_left(keys, f"{fqn}/", start)  # "/" follows "." in code point order

    def has(self, fqn: str) -> bool:
        """Whether the checkpoint stores a key below ``fqn``."""
        _, start, end = self._span(fqn)
        return start != end

    def find(self, fqn: str) -> str | None:
        """``None``, or how the checkpoint holds ``fqn`` as keys below it (how many, the first)."""
        keys, start, end = self._span(fqn)
        if start == end:
            return None
        more = f", {end - start - 1} more" if end - start > 1 else ""
        return f"the checkpoint holds {end - start} value(s) below it ({keys[start]}{more})"


def _empty_containers(flat: Flattened) -> list[str]:
    """The keys of the dicts, lists and tuples in ``flat`` that hold no leaf (not the root)."""
    order: list[str] | None = None
    empty = []
    for path, _, position in flat.containers:
        if not path:
            continue
        if order is None:
            order = list(flat.leaves)
        fqn = ".".join(map(str, path))
        if position >= len(order) or not order[position].startswith(f"{fqn}."):
            empty.append(fqn)
    return empty


def _kind(value: Any) -> str:
    """What ``value`` is, as a mismatch names it (a sparse tensor is no dense one)."""
    if value is None:
        return "None"
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}"
    if value.is_quantized:
        return "a quantized tensor"
    if value.is_nested:
        return "a nested tensor"
    if value.layout != torch.strided:
        return f"a {str(value.layout).removeprefix('torch.')} tensor"
    return "a tensor"


def _stored_ancestor(fqn: str, stored: Mapping[str, Any]) -> str | None:
    """The key above ``fqn`` that the checkpoint stores as one value, if any."""
    dot = fqn.rfind(".")
    while dot > 0:
        if fqn[:dot] in stored:
            return fqn[:dot]
        dot = fqn.rfind(".", 0, dot)
    return None


class DefaultLoadPlanner(LoadPlanner):
    """Fills the keys a state dict holds from a checkpoint, in place, resharding as needed.

    Keys only the checkpoint has are ignored (as DCP does). ``strict``
    (default) rejects keys of the state dict that the checkpoint lacks,
    naming each; with ``strict=False`` they are left as they are. A dtype
    difference is an error unless ``cast``, which converts on load. A shape
    mismatch is always an error. Tensors on the meta device are replaced by
    new CPU tensors (DTensors: new local shards on their mesh's device);
    ``before_allocating(metadata, keys)`` runs first and may refuse (torchstow.load
    checks there that their data files are present).
    """

    def __init__(
        self,
        *,
        flatten_state_dict: bool = True,
        strict: bool = True,
        allow_pickle: bool = False,
        cast: bool = False,
        before_allocating: Callable[[Metadata, list[str]], None] | None = None,
    ) -> None:
        if not flatten_state_dict:
            raise ValueError("torchstow's DefaultLoadPlanner always flattens the state dict")
        self.before_allocating = before_allocating
        self.strict = strict
        self.allow_pickle = allow_pickle
        self.cast = cast
        self.missing_keys: list[str] = []
        self.unexpected_keys: list[str] = []
        self._aliases: AliasTracker | None = None  # set by create_local_plan

    def set_up_planner(
        self, state_dict: Mapping[str, Any], metadata: Metadata, is_coordinator: bool = False
    ) -> None:
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator
        flat = flatten_state_dict(state_dict)
        stored = metadata.state_dict_metadata
        below = _StoredBelow(stored)
        empty = _empty_containers(flat)
        empty += _split_as_stored(flat, stored, below)
        self.paths = flat.paths
        self.leaves = flat.leaves
        self.missing_keys = []
        self.unexpected_keys = [k for k in stored if k not in flat.leaves]
        problems = []
        for fqn, value in flat.leaves.items():
            entry = stored.get(fqn)
            if entry is None:
                # not missing where the checkpoint holds it otherwise: strict=False must not
                # keep the old value of a key the checkpoint holds
                whole = _stored_ancestor(fqn, stored)
                if whole is not None:
                    problems.append((f"{fqn}: the checkpoint holds all of {whole} as one value", True))
                    continue
                held = below.find(fqn)
                if held is None:
                    self.missing_keys.append(fqn)
                else:
                    problems.append((f"{fqn}: {held}, the state dict {_kind(value)}", True))
                continue
            problem = self._mismatch(fqn, value, entry)
            if problem:
                problems.append(problem)
        hard = [p for p, is_hard in problems if is_hard or not self.cast]
        hints = []
        if any(not is_hard for _, is_hard in problems) and not self.cast:
            hints.append("pass cast=True to convert dtypes on load")
        unfilled = [f"{fqn}: empty in the state dict; {held}" for fqn in empty if (held := below.find(fqn))]
        held_whole = [
            f"{fqn}: the checkpoint holds it as one value, the state dict an empty container"
            for fqn in empty
            if fqn in stored
        ]
        problems += [(p, True) for p in held_whole]
        hard += held_whole
        problems += [(p, self.strict) for p in unfilled]
        if unfilled and self.strict:
            hard += unfilled
            hints.append(
                "build the state dict with the structure that was saved (an optimizer has state "
                "once it has stepped), or pass strict=False to leave empty containers empty"
            )
        missing = self.missing_keys if self.strict else []
        if missing:
            hints.append("pass strict=False to leave keys the checkpoint lacks as they are")
        if hard or missing:
            raise StateDictMismatchError(
                mismatch_message(
                    "the state dict does not match the checkpoint:",
                    missing=missing,
                    unexpected=self.unexpected_keys,
                    problems=hard,
                    hints=hints,
                ),
                missing_keys=self.missing_keys,
                unexpected_keys=self.unexpected_keys,
                mismatched=[p for p, _ in problems],
            )
        meta = [
            fqn
            for fqn, value in flat.leaves.items()
            if isinstance(value, torch.Tensor) and value.device.type == "meta" and fqn in stored
        ]
        if meta and self.before_allocating is not None:
            self.before_allocating(metadata, meta)
        made: dict[int, torch.Tensor] = {}  # one new tensor per meta tensor: tied keys stay tied
        for fqn in meta:
            old = flat.leaves[fqn]
            value = made.get(id(old))
            if value is None:
                value = made[id(old)] = materialize(old)
            flat.leaves[fqn] = value
            self.state_dict = set_leaf(self.state_dict, flat.paths[fqn], value)
        for fqn in flat.leaves:
            entry = stored.get(fqn)
            if isinstance(entry, BytesStorageMetadata):
                check_unpickling_allowed(fqn, entry.encoding, allow_pickle=self.allow_pickle)

    @staticmethod
    def _mismatch(fqn: str, value: Any, entry: Any) -> tuple[str, bool] | None:
        """(description, always an error) when ``value`` cannot take ``entry``."""
        is_tensor = isinstance(entry, TensorStorageMetadata)
        if is_tensor != is_raw_tensor(value):
            want = "a tensor" if is_tensor else "a non-tensor value"
            return f"{fqn}: the checkpoint holds {want}, the state dict {_kind(value)}", True
        if not is_tensor:
            return None
        shape = value.shape
        if shape != entry.size:
            return f"{fqn}: shape {list(entry.size)} in the checkpoint, {list(shape)} in the state dict", True
        if value.dtype != entry.properties.dtype:
            return (
                f"{fqn}: dtype {dtype_name(entry.properties.dtype)} in the checkpoint, "
                f"{dtype_name(value.dtype)} in the state dict",
                False,
            )
        return None

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        items: list[ReadItem] = []
        targets: dict[MetadataIndex, torch.Tensor] = {}
        self._targets = targets
        self._aliases = AliasTracker(self.metadata)
        target = self._aliases.target
        tensor_items = 0
        for fqn, value in self.leaves.items():
            entry = stored.get(fqn)
            if entry is None:
                continue
            if isinstance(entry, TensorStorageMetadata):
                for chunk, local in local_chunks(value, fqn):
                    dest_index = MetadataIndex(fqn, chunk.offsets)
                    targets[dest_index] = target(fqn, chunk.offsets, local.detach())
                    reads = _read_items_for(fqn, dest_index, chunk, entry.chunks)
                    tensor_items += len(reads)
                    items.extend(reads)
            elif entry.encoding == JSON:
                self.state_dict = set_leaf(self.state_dict, self.paths[fqn], entry.value)
            else:
                index = MetadataIndex(fqn)
                items.append(
                    ReadItem(LoadItemType.BYTE_IO, index, torch.Size(), index, torch.Size(), torch.Size())
                )
        self._aliases.expect(tensor_items)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        entry = self.metadata.state_dict_metadata[fqn]
        assert isinstance(entry, BytesStorageMetadata)
        encoding = object_encoding(self.metadata, entry.encoding, allow_pickle=self.allow_pickle)
        foreign = isinstance(self.metadata.storage_data, DcpLocations) and encoding == TORCH
        try:
            obj = decode_object(fqn, encoding, value.getvalue(), allow_pickle=self.allow_pickle)
        except CorruptCheckpointError as exc:
            if foreign and isinstance(exc.__cause__, pickle.UnpicklingError):
                raise PickleNotAllowedError(
                    f"{fqn}: this DCP checkpoint stores the object with full pickle, which runs arbitrary "
                    "code on load; pass allow_pickle=True if you trust the checkpoint"
                ) from exc
            raise
        self.state_dict = set_leaf(self.state_dict, self.paths[fqn], obj)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self._targets[read_item.dest_index]
        if read_item.lengths == target.shape:
            return target
        return chunk_math.region(target, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        if self._aliases is not None:
            self._aliases.committed()
