"""Behaviours of torch.distributed.checkpoint that PyTorch's own DCP tests check, tried on torchstow.

Written from DCP's documented behaviour and its sources (not copied from its tests): the
tutorial's ``AppState`` recipe, the state dict after a load, the order of a global plan,
and the keywords DCP's calls take.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dcp_scenarios import AppState  # the tutorial's recipe: model and optimizer through get/set_state_dict
from torch.distributed.checkpoint.staging import DefaultStager as DcpDefaultStager
from torch.distributed.checkpoint.staging import StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

import torchstow
import torchstow.checkpointing
import torchstow.planning
from torchstow.core.planning import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torchstow.core.planning.save_planner import dedup_save_plans
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)


def _trained(lr: float, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("writer", ["stock", "adapter"])
def test_load_restores_the_recipes_hyperparameters(writer: str, ckpt: str) -> None:
    # dcp.save stores param_groups as flat keys (param_groups.0.lr ...); torchstow.load
    # loads them where they belong, as dcp.load does: lr 0.1, not the target's 0.5.
    model, optimizer = _trained(0.1, seed=0)
    if writer == "adapter":
        dcp.save({"app": AppState(model, optimizer)}, storage_writer=torchstow.dcp_storage_writer(ckpt))
    else:
        dcp.save({"app": AppState(model, optimizer)}, checkpoint_id=ckpt)
    model2, optimizer2 = _trained(0.5, seed=1)
    target = {"app": AppState(model2, optimizer2)}
    torchstow.load(target, ckpt)
    assert optimizer2.param_groups[0]["lr"] == 0.1
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(optimizer2.state[model2.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    # What stock dcp.load restores, torchstow.load restores.
    model3, optimizer3 = _trained(0.5, seed=2)
    if writer == "stock":
        dcp.load({"app": AppState(model3, optimizer3)}, checkpoint_id=ckpt)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer3.param_groups]
        assert hyper == [{k: v for k, v in g.items() if k != "params"} for g in optimizer2.param_groups]


def test_a_value_the_checkpoint_holds_whole_is_never_left_to_strict_false(ckpt: str) -> None:
    # The checkpoint stores "cfg.sizes" as one value; a target that splits it finer must not be
    # told strict=False (which would keep the target's old values): it is a mismatch, always.
    torchstow.save({"cfg": {"sizes": [1, 2]}}, ckpt)
    for strict in (True, False):
        target: dict[str, Any] = {"cfg": {"sizes": [torch.zeros(1), torch.zeros(1)]}}
        with pytest.raises(
            torchstow.StateDictMismatchError, match=r"holds all of cfg\.sizes as one value"
        ) as info:
            torchstow.load(target, ckpt, strict=strict)
        assert "strict=False" not in str(info.value)


class _RecordingDict(dict[str, Any]):
    """A state dict that records the keys assigned into it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.assigned: list[str] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self.assigned.append(key)
        super().__setitem__(key, value)


class _Loaded(Stateful):
    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"n": 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = dict(state_dict)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("loader", ["torchstow", "dcp"])
def test_stateful_values_are_loaded_in_place_and_others_assigned(loader: str, ckpt: str) -> None:
    # dcp.load: a Stateful is loaded through load_state_dict and its key is not assigned; every
    # other top-level key is assigned the loaded value (state_dict[key] = ...).
    torchstow.save({"obj": _Loaded(), "t": torch.ones(2), "epoch": 3}, ckpt)
    obj = _Loaded()
    t = torch.zeros(2)
    target = _RecordingDict({"obj": obj, "t": t, "epoch": 0})
    if loader == "dcp":
        dcp.load(target, storage_reader=torchstow.dcp_storage_reader(ckpt))
    else:
        torchstow.load(target, ckpt)
    assert target["obj"] is obj and obj.loaded == {"n": 1}
    assert sorted(target.assigned) == ["epoch", "t"]
    assert target["t"] is t and torch.equal(t, torch.ones(2))
    assert target["epoch"] == 3


def _local_plan(rank: int, world: int, aligned: bool) -> SavePlan:
    """A rank's local plan as DCP's test builds it: a replicated tensor, a JSON value, an
    object, a shard of a row-sharded tensor, and (unless aligned) a key of its own."""
    state: dict[str, Any] = {"tensor": torch.rand(10), "value": [1, 2, 3], "obj": b"raw"}
    if not aligned:
        state[f"own{rank}"] = torch.ones(2)
    planner = torchstow.planning.DefaultSavePlanner()
    planner.set_up_planner(state, None, rank == 0)
    plan = planner.create_local_plan()
    chunk = ChunkStorageMetadata(torch.Size([2 * rank, 0]), torch.Size([2, 3]))
    data = TensorWriteData(chunk, TensorProperties(torch.float32), torch.Size([2 * world, 3]))
    plan.items.insert(2, WriteItem(MetadataIndex("st", chunk.offsets), WriteItemType.SHARD, data))
    return plan


@pytest.mark.parametrize("aligned", [True, False], ids=["columnar", "general"])
def test_global_plan_keeps_each_ranks_items_in_order(aligned: bool) -> None:
    # DCP: the global plan of deduplicated plans holds every rank's items, in their order,
    # each with its lookup hint set; the metadata describes each of them.
    world = 4
    plans = dedup_save_plans([_local_plan(rank, world, aligned) for rank in range(world)])
    final, metadata = torchstow.planning.DefaultSavePlanner().create_global_plan(plans)
    assert len(final) == world
    stored = metadata.state_dict_metadata
    for new_plan, old_plan in zip(final, plans, strict=True):
        assert [item.index for item in new_plan.items] == [item.index for item in old_plan.items]
        for new_item, old_item in zip(new_plan.items, old_plan.items, strict=True):
            assert new_item.type == old_item.type
            assert new_item.tensor_data == old_item.tensor_data
            entry = stored[new_item.index.fqn]
            if new_item.type == WriteItemType.BYTE_IO:
                assert isinstance(entry, BytesStorageMetadata)
            else:
                assert isinstance(entry, TensorStorageMetadata)
                assert new_item.tensor_data is not None
                assert entry.size == new_item.tensor_data.size
                assert new_item.index.index is not None
                assert entry.chunks[new_item.index.index].offsets == new_item.index.offset
    assert sum(len(plan.items) for plan in final) == sum(len(plan.items) for plan in plans)


@pytest.mark.parametrize("name", ["save", "async_save", "load"])
def test_every_keyword_of_dcps_calls_is_accepted(name: str) -> None:
    theirs = inspect.signature(getattr(dcp, name)).parameters
    ours = inspect.signature(getattr(torchstow, name)).parameters
    assert [key for key in theirs if key not in ours] == []


def test_save_without_collectives_in_one_process(ckpt: str) -> None:
    torchstow.save({"x": torch.arange(3.0)}, checkpoint_id=ckpt, use_collectives=False)
    assert torch.equal(torchstow.read(ckpt)["x"], torch.arange(3.0))


@pytest.mark.parametrize("kind", list(AsyncCheckpointerType))
def test_async_save_takes_dcps_checkpointer_type_and_stager(kind: AsyncCheckpointerType, ckpt: str) -> None:
    stager = DcpDefaultStager(
        StagingOptions(
            use_pinned_memory=False,
            use_shared_memory=False,
            use_async_staging=True,
            use_non_blocking_copy=False,
        )
    )
    try:
        state = {"x": torch.arange(4.0), "step": 2}
        saving = torchstow.async_save(
            state, checkpoint_id=ckpt, async_checkpointer_type=kind, async_stager=stager
        )
        state["x"].add_(100)  # staged: the save holds DCP's stager's copy
        saving.result(timeout=60)
    finally:
        stager.close()
    back = torchstow.read(ckpt)
    assert torch.equal(back["x"], torch.arange(4.0)) and back["step"] == 2


def test_async_save_refuses_two_stagers_and_unknown_types(ckpt: str) -> None:
    stager = torchstow.checkpointing.DefaultStager()
    try:
        with pytest.raises(ValueError, match="not both"):
            torchstow.async_save({"x": torch.ones(1)}, ckpt, stager=stager, async_stager=stager)
        with pytest.raises(ValueError, match="async_checkpointer_type"):
            torchstow.async_save({"x": torch.ones(1)}, ckpt, async_checkpointer_type="fork")
    finally:
        stager.close()
    assert not torchstow.list_checkpoints(ckpt.rsplit("/", 1)[0])
