"""The coordinator's column-wise planner (every rank lists the same keys) plans exactly
as the general item-by-item one: same kept items per rank, same lookup hints, same
balancing of replicated items, same manifest entries and the same errors."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest
import torch

from torchstow.core.planning import (
    BytesWriteData,
    DefaultSavePlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torchstow.core.planning.aligned_plan import aligned_global_plan
from torchstow.core.planning.save_planner import dedup_save_plans, global_entries
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _random_plans(seed: int, share: bool = True) -> list[SavePlan]:
    """Plans as ranks send them: every rank the same keys in the same order, a mix of
    shards, tensors every rank holds, tensors replicated within groups of ranks
    (a 2-D mesh), and objects, each rank's plan pickled on its own. With ``share``
    a rank's items of one chunk shape share their write data (as torchstow's
    planner makes them), else each item has its own."""
    rng = random.Random(seed)
    ranks = rng.choice([1, 2, 3, 4, 6])
    keys: list[tuple[str, str, Any]] = []
    for k in range(rng.randint(1, 30)):
        kind = rng.choice(["shard", "whole", "group", "json", "torch"])
        keys.append((f"k{k}", kind, (rng.choice(DTYPES), rng.randint(1, 5), rng.randint(1, 4))))
    plans = []
    for rank in range(ranks):
        items = []
        shared: dict[Any, TensorWriteData] = {}  # a rank's planner shares its write data
        for fqn, kind, (dtype, rows, cols) in keys:
            if kind in ("json", "torch"):
                value = {"rank": rank} if kind == "json" else None
                data = BytesWriteData("json" if kind == "json" else "torch", value)
                items.append(WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO, None, data))
                continue
            parts = {"shard": ranks, "whole": 1, "group": 2 if ranks % 2 == 0 else 1}[kind]
            part = rank % parts
            size = torch.Size((rows * parts, cols))
            offsets = torch.Size((rows * part, 0))
            key = (dtype, offsets, rows, size)
            td = shared.get(key) if share else None
            if td is None:
                chunk = ChunkStorageMetadata(offsets, torch.Size((rows, cols)))
                td = shared[key] = TensorWriteData(chunk, TensorProperties(dtype), size)
            kind_of = WriteItemType.TENSOR if parts == 1 else WriteItemType.SHARD
            items.append(WriteItem(MetadataIndex(fqn, offsets), kind_of, td))
        plan = SavePlan(items, planner_data={"containers": [], "paths": {}})
        plans.append(pickle.loads(pickle.dumps(plan)))
    return plans


def _general(plans: list[SavePlan], dedup: bool) -> tuple[list[SavePlan], Any]:
    if dedup and len(plans) > 1:
        plans = dedup_save_plans(plans)
    return global_entries(plans)


def _described(planned: tuple[list[SavePlan], Any]) -> tuple[Any, Any]:
    plans, entries = planned
    items = [[(i.index.fqn, i.index.offset, i.index.index, i.type) for i in plan.items] for plan in plans]
    described = {}
    for fqn, entry in entries.items():
        if isinstance(entry, TensorStorageMetadata):
            chunks = [(c.offsets, c.sizes) for c in entry.chunks]
            described[fqn] = (entry.properties, entry.size, chunks)
        else:
            assert isinstance(entry, BytesStorageMetadata)
            described[fqn] = (entry.encoding, entry.value)
    return items, described


def _outcome(plan: Any) -> Any:
    try:
        return _described(plan())
    except ValueError as exc:  # replicas overlap when not deduplicated: refused alike
        return str(exc)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("seed", range(30))
def test_columns_plan_as_items_do(seed: int, dedup: bool, share: bool) -> None:
    plans = _random_plans(seed, share)
    copy = pickle.loads(pickle.dumps(plans))
    aligned = _outcome(lambda: aligned_global_plan(plans, dedup))
    assert aligned == _outcome(lambda: _general(copy, dedup))
    if dedup:  # deduplicated, the random plans are all valid
        assert not isinstance(aligned, str)
        assert aligned_global_plan(pickle.loads(pickle.dumps(plans)), dedup) is not None


def _object(fqn: str) -> WriteItem:
    return WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO, None, BytesWriteData("torch"))


def _plans_with(values: list[Any]) -> list[SavePlan]:
    """One key per plan: a tensor (a TensorWriteData) or an object (None)."""
    plans = []
    for value in values:
        if value is None:
            item = _object("x")
        else:
            item = WriteItem(MetadataIndex("x", torch.Size((0,))), WriteItemType.TENSOR, value)
        plans.append(SavePlan([item]))
    return plans


def _data(dtype: torch.dtype, n: int) -> TensorWriteData:
    return TensorWriteData(
        ChunkStorageMetadata(torch.Size((0,)), torch.Size((n,))), TensorProperties(dtype), torch.Size((n,))
    )


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
@pytest.mark.parametrize("aligned", [True, False])
def test_a_key_that_is_a_tensor_on_one_rank_and_an_object_on_another_is_refused(
    order: tuple[int, int], aligned: bool
) -> None:
    values = [_data(torch.float32, 4), None]
    plans = _plans_with([values[i] for i in order])
    if not aligned:  # a second key on rank 0 only sends the plans to the general planner
        plans[0].items.append(_object("y"))
    with pytest.raises(ValueError, match="x is a tensor on one rank and an object on another"):
        DefaultSavePlanner(dedup_replicated_tensors=False).create_global_plan(plans)


def test_ranks_disagreeing_on_a_tensor_are_named() -> None:
    plans = _plans_with([_data(torch.float32, 4), _data(torch.int64, 4)])
    message = r"x: ranks disagree on the tensor: shape \[4\] float32 vs \[4\] int64"
    with pytest.raises(ValueError, match=message):
        DefaultSavePlanner(dedup_replicated_tensors=False).create_global_plan(plans)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(
    ("other", "shown"),
    [
        (_data(torch.int64, 4), r"\[4\] float32 vs \[4\] int64"),
        (_data(torch.float32, 6), r"\[4\] float32 vs \[6\]"),
    ],
    ids=["dtype", "shape"],
)
def test_ranks_disagreeing_on_a_tensor_are_refused_when_replicas_are_deduplicated(
    aligned: bool, other: TensorWriteData, shown: str
) -> None:
    # a plain tensor every rank holds under one key is one replica, kept once: not where the
    # ranks' tensors differ in shape or dtype (before, one rank's was kept, the other's lost)
    plans = _plans_with([_data(torch.float32, 4), other])
    if not aligned:
        plans[0].items.append(_object("y"))
    with pytest.raises(ValueError, match=f"x: ranks disagree on the tensor: shape {shown}"):
        DefaultSavePlanner().create_global_plan(plans)


def test_plans_with_different_keys_go_to_the_general_planner() -> None:
    plans = _plans_with([_data(torch.float32, 4), _data(torch.float32, 4)])
    plans[1].items.append(_object("y"))
    assert aligned_global_plan(plans, True) is None
    final, metadata = DefaultSavePlanner().create_global_plan(plans)
    assert sorted(metadata.state_dict_metadata) == ["x", "y"]
    assert sum(len(plan.items) for plan in final) == 2  # x deduplicated


def _replicated_plans() -> list[SavePlan]:
    """Three ranks: a float32 shard ``s`` of 3, 1 and 1 elements (each rank's own item),
    then whole tensors every rank holds of 1, 3, 3 and 1 elements, then two objects."""
    plans = []
    for offset, rows in ((0, 3), (3, 1), (4, 1)):
        chunk = ChunkStorageMetadata(torch.Size((offset,)), torch.Size((rows,)))
        shard = TensorWriteData(chunk, TensorProperties(torch.float32), torch.Size((5,)))
        items = [WriteItem(MetadataIndex("s", chunk.offsets), WriteItemType.SHARD, shard)]
        for fqn, n in (("a", 1), ("b", 3), ("c", 3), ("d", 1)):
            items.append(
                WriteItem(MetadataIndex(fqn, torch.Size((0,))), WriteItemType.TENSOR, _data(torch.float32, n))
            )
        items += [_object("o"), _object("p")]
        plans.append(SavePlan(items))
    return plans


@pytest.mark.parametrize("aligned", [True, False])
def test_replicated_items_go_biggest_first_to_the_least_loaded_rank(aligned: bool) -> None:
    """Own bytes 12, 4, 4: b (12 B) goes to rank 1 and c (equal size, later) to rank 2; then a
    to rank 0 (12 B vs 16 B); d to rank 0, the lowest of three ranks tied on bytes and items;
    o to rank 1 (16 B, 2 items), and p to rank 2 (tied on bytes with rank 1, fewer items)."""
    plans = _replicated_plans()
    planned = aligned_global_plan(plans, True) if aligned else _general(plans, True)
    assert planned is not None
    kept = [sorted(item.index.fqn for item in plan.items if item.index.fqn != "s") for plan in planned[0]]
    assert kept == [["a", "d"], ["b", "o"], ["c", "p"]]
