"""The coordinator's global save plan when every rank lists the same keys in the same order.

That is what SPMD training gives (data parallel, FSDP, tensor parallel: every
rank flattens the same model). It lets the coordinator work on columns (one
key on every rank) instead of on items: each rank's items are read once, in
the order they arrived (memory read in sequence), into lists of indices and
write data, and each column is then known by the identities of its write
data and offsets. A rank's items share their write data objects (its planner
makes one per distinct chunk, and unpickling keeps that sharing), so a
model's columns fall into a few classes, about one per distinct shape and
placement. Classifying duplicates, checking shape and dtype agree and
validating the cover of the chunks run once per class; per item there
remain a few list operations that the interpreter runs in C. The result is
the general planner's (``DefaultSavePlanner.create_global_plan``) exactly;
that planner plans every other case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

from torchstow.core.planning.balance import assign_owners, item_bytes
from torchstow.core.planning.items import SavePlan, TensorWriteData
from torchstow.format import chunks as chunk_math
from torchstow.format.manifest import BytesStorageMetadata, TensorStorageMetadata, dtype_name

__all__ = ["Entries", "aligned_global_plan", "check_tensor", "dedup_key", "mixed_kinds"]

Entries = dict[str, TensorStorageMetadata | BytesStorageMetadata]


@dataclass(eq=False)
class _Class:
    """Columns whose write data and offsets are equal on every rank (mostly the same objects)."""

    first: int  # the first column of the class
    tds: tuple[TensorWriteData | None, ...]
    offsets: tuple[Any, ...]
    tensor: bool
    #: for each distinct offset, the ranks holding it in rank order: [[0], [1], ...]
    #: for shards, [[0, 1, ...]] for an item every rank holds (one per rank without dedup)
    holders: list[list[int]]
    columns: int = 0  # how many columns it has
    distinct: bool = True  # whether every rank's item is its own (nothing to deduplicate)
    entry: TensorStorageMetadata | None = None  # validated, when every rank keeps its item

    def __post_init__(self) -> None:
        self.distinct = all(len(group) == 1 for group in self.holders)


def _classify(
    fqn: str, j: int, tds: tuple[TensorWriteData | None, ...], offsets: tuple[Any, ...], dedup: bool
) -> _Class:
    tensor = tds[0] is not None
    if any((td is not None) != tensor for td in tds):
        raise mixed_kinds(fqn)
    if not dedup:
        return _Class(j, tds, offsets, tensor, [[r] for r in range(len(tds))])
    by_offset: dict[Any, list[int]] = {}
    for rank, offset in enumerate(offsets):
        by_offset.setdefault(dedup_key(offset, tds[rank]), []).append(rank)
    return _Class(j, tds, offsets, tensor, list(by_offset.values()))


def dedup_key(offset: Any, td: TensorWriteData | None) -> Any:
    """What items of one key that ranks hold must share to be one item, kept once: the
    offset, and for a tensor the chunk's sizes, the global shape and the dtype (ranks
    that disagree keep their items, which the checks of the entry then refuse)."""
    if td is None:
        return offset
    return (offset, td.chunk.sizes, td.size, td.properties.dtype)


def _classes(
    fqns: list[str], td_columns: list[tuple[Any, ...]], offsets: list[list[Any]], dedup: bool
) -> list[_Class]:
    """The class of each column.

    A column is looked up by the identities of three of its write data
    (first, middle and last rank) and then compared whole; the comparison
    is one identity test per rank when the column shares its objects with
    the class, and falls back to comparing values, so equal columns always
    share a class, however their objects came to be.
    """
    buckets: dict[tuple[int, int, int], list[_Class]] = {}
    columns: list[_Class] = []
    mid = len(offsets) // 2
    for j, (fqn, tds, offs) in enumerate(zip(fqns, td_columns, zip(*offsets, strict=True), strict=True)):
        key = (id(tds[0]), id(tds[mid]), id(tds[-1]))
        bucket = buckets.setdefault(key, [])
        for cls in bucket:
            if cls.tds == tds and cls.offsets == offs:
                break
        else:
            cls = _classify(fqn, j, tds, offs, dedup)
            bucket.append(cls)
        cls.columns += 1
        columns.append(cls)
    return columns


def mixed_kinds(fqn: str) -> ValueError:
    """The error for a key that is a tensor on one rank and an object on another."""
    return ValueError(f"{fqn} is a tensor on one rank and an object on another")


def check_tensor(fqn: str, entry: TensorStorageMetadata, td: TensorWriteData) -> None:
    """Raise ValueError unless a rank's write data agree with the entry on shape and dtype."""
    if td.size != entry.size or td.properties.dtype != entry.properties.dtype:
        raise ValueError(
            f"{fqn}: ranks disagree on the tensor: shape {list(entry.size)} "
            f"{dtype_name(entry.properties.dtype)} vs {list(td.size)} {dtype_name(td.properties.dtype)}"
        )


def _entry(fqn: str, tds: Sequence[Any], memo: dict[int, Any]) -> TensorStorageMetadata:
    """The entry of a tensor stored as the chunks of ``tds`` (in rank order), validated."""
    first = tds[0]
    entry = TensorStorageMetadata(first.properties, first.size, [td.chunk for td in tds])
    for td in dict.fromkeys(tds):  # each distinct write data once
        check_tensor(fqn, entry, td)
    chunk_math.validate_cover(fqn, first.size, entry.chunks, memo)
    return entry


def _owners(
    classes: list[_Class], columns: list[_Class], td_columns: list[tuple[Any, ...]], ranks: int
) -> dict[int, list[int]]:
    """The ranks that keep each column's items, for columns some rank's item is dropped from.

    An item several ranks hold goes to the rank :func:`assign_owners` picks,
    after every rank is charged its own items.
    """
    load = [0] * ranks
    count = [0] * ranks
    for cls in classes:  # each rank's own items, a class at a time
        tds = td_columns[cls.first]
        for group in cls.holders:
            if len(group) == 1:
                load[group[0]] += item_bytes(tds[group[0]]) * cls.columns
                count[group[0]] += cls.columns
    shared = [
        (group[0], j, group, item_bytes(td_columns[j][group[0]]))
        for j, cls in enumerate(columns)
        if not cls.distinct
        for group in cls.holders
        if len(group) > 1
    ]
    shared.sort(key=lambda s: (s[0], s[1]))  # the order they first appear in, rank by rank
    chosen = assign_owners(load, count, [(size, group) for _, _, group, size in shared])
    owner = {(j, first): best for (first, j, _, _), best in zip(shared, chosen, strict=True)}
    kept: dict[int, list[int]] = {}
    for j, cls in enumerate(columns):
        if not cls.distinct:
            kept[j] = sorted(group[0] if len(group) == 1 else owner[j, group[0]] for group in cls.holders)
    return kept


def aligned_global_plan(all_plans: list[SavePlan], dedup: bool) -> tuple[list[SavePlan], Entries] | None:
    """Final plans and the manifest's entries, or None unless every rank's plan
    lists the same keys, once each, in the same order.

    Tensor items get their lookup hint (their chunk's place in the entry) as
    they are read: the rank, in a column every rank keeps. When the plans turn
    out not to be aligned, the general planner sets every kept item's hint again.
    """
    lists = [plan.items for plan in all_plans]
    fqns = [item.index.fqn for item in lists[0]]
    width = len(fqns)
    if len(set(fqns)) != width:
        return None
    indices: list[list[Any]] = []
    datas: list[list[TensorWriteData | None]] = []
    offsets: list[list[Any]] = []
    for rank, rank_items in enumerate(lists):  # one rank at a time, while its objects are in cache
        if len(rank_items) != width:
            return None
        index = [item.index for item in rank_items]
        if [i.fqn for i in index] != fqns:
            return None
        rank_tds = [item.tensor_data for item in rank_items]
        for i, td in zip(index, rank_tds, strict=True):
            if td is not None:
                i.index = rank  # the lookup hint, as DCP fills it
        indices.append(index)
        offsets.append([i.offset for i in index])
        datas.append(rank_tds)
    ranks = len(lists)
    dedup = dedup and ranks > 1
    td_columns = list(zip(*datas, strict=True))
    del datas
    columns = _classes(fqns, td_columns, offsets, dedup)
    del offsets
    owners = _owners(list(dict.fromkeys(columns)), columns, td_columns, ranks) if dedup else {}

    entries: Entries = {}
    plain = [True] * width  # the positions every rank keeps
    kept_by_rank: list[list[int]] = [[] for _ in range(ranks)]  # what each rank keeps of the others
    memo: dict[int, Any] = {}
    validated: dict[tuple[int, ...], TensorStorageMetadata] = {}
    for j, (fqn, cls, tds) in enumerate(zip(fqns, columns, td_columns, strict=True)):
        kept = owners.get(j)
        if cls.tensor and kept is None:
            if cls.entry is None:
                cls.entry = _entry(fqn, tds, memo)
            entries[fqn] = TensorStorageMetadata(cls.entry.properties, cls.entry.size, list(cls.entry.chunks))
            continue
        plain[j] = False
        kept = kept or list(range(ranks))
        if cls.tensor:
            chosen = [tds[r] for r in kept]
            ids = tuple(map(id, chosen))
            entry = validated.get(ids)
            if entry is None:
                entry = validated[ids] = _entry(fqn, chosen, memo)
            entries[fqn] = TensorStorageMetadata(entry.properties, entry.size, list(entry.chunks))
            for position, rank in enumerate(kept):
                indices[rank][j].index = position
        else:
            data = lists[kept[-1]][j].bytes_data
            assert data is not None
            entries[fqn] = BytesStorageMetadata(data.encoding, data.value)
        for rank in kept:
            kept_by_rank[rank].append(j)

    every = all(plain)
    final = []
    for plan, kept in zip(all_plans, kept_by_rank, strict=True):
        if every:
            items = list(plan.items)
        else:
            mask = plain.copy()
            for j in kept:
                mask[j] = True
            items = list(compress(plan.items, mask))
        final.append(SavePlan(items, plan.storage_data, plan.planner_data))
    return final, entries
