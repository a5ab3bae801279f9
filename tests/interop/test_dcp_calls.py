"""DCP's calls in torchstow.save/load/async_save, and cases ported from DCP's own tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorProperties as DcpTensorProperties

import torchstow
import torchstow.planning
from torchstow.core.planning import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torchstow.planning import LoadPlan
from torchstow.spi import StorageReader, StorageWriter


class Counter:
    """A user object that is Stateful (state_dict/load_state_dict) and nothing else."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "t": torch.full((2,), float(self.n))}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]
        assert torch.equal(sd["t"], torch.full((2,), float(sd["n"])))


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_checkpoint_id_names_the_target(ckpt: str) -> None:
    torchstow.save({"x": torch.arange(3)}, checkpoint_id=ckpt)
    target = {"x": torch.zeros(3, dtype=torch.int64)}
    torchstow.load(target, checkpoint_id=Path(ckpt))
    assert target["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"uri": "a", "checkpoint_id": "b"}, {"checkpoint_id": "b", "storage_writer": "w"}],
    ids=["none", "uri+checkpoint_id", "checkpoint_id+writer"],
)
def test_exactly_one_target(kwargs: dict[str, Any], ckpt: str) -> None:
    if "storage_writer" in kwargs:
        kwargs["storage_writer"] = torchstow.storage_writer(ckpt)
    with pytest.raises(ValueError, match="exactly one of uri, checkpoint_id or storage_writer"):
        torchstow.save({"x": 1}, **kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        torchstow.async_save({"x": 1}, **kwargs)
    assert not os.path.exists(ckpt)


def test_stock_dcp_writer_is_refused_with_a_pointer(ckpt: str) -> None:
    with pytest.raises(TypeError, match=r"dcp\.save"):
        torchstow.save({"x": 1}, storage_writer=dcp.FileSystemWriter(ckpt))


class NoRankWriter(StorageWriter):
    """A DCP-style writer whose set_up_storage_writer takes no rank= keyword."""

    def __init__(self, inner: StorageWriter) -> None:
        self.inner = inner
        self.set_up_calls = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        self.inner.reset(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool) -> None:  # type: ignore[override]
        self.set_up_calls += 1
        self.inner.set_up_storage_writer(is_coordinator)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return self.inner.prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: Any) -> Any:
        return self.inner.write_data(plan, planner)

    def finish(self, metadata: Any, results: Any) -> None:
        self.inner.finish(metadata, results)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class NoRankReader(StorageReader):
    """A DCP-style reader whose set_up_storage_reader takes no rank= keyword."""

    def __init__(self, inner: StorageReader) -> None:
        self.inner = inner
        self.set_up_calls = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        self.inner.reset(checkpoint_id)

    def read_metadata(self) -> Any:  # type: ignore[override]
        return self.inner.read_metadata()

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool) -> None:  # type: ignore[override]
        self.set_up_calls += 1
        self.inner.set_up_storage_reader(metadata, is_coordinator)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return self.inner.prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: Any) -> Any:
        return self.inner.read_data(plan, planner)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def test_custom_storage_without_rank_keyword(ckpt: str) -> None:
    writer = NoRankWriter(torchstow.storage_writer(ckpt))
    torchstow.save({"x": torch.ones(2)}, storage_writer=writer)
    reader = NoRankReader(torchstow.storage_reader(ckpt))
    target = {"x": torch.zeros(2)}
    torchstow.load(target, storage_reader=reader)
    assert writer.set_up_calls == reader.set_up_calls == 1
    assert torch.equal(target["x"], torch.ones(2))


def test_async_save_with_storage_writer(ckpt: str) -> None:
    saving = torchstow.async_save({"x": torch.arange(4.0)}, storage_writer=torchstow.storage_writer(ckpt))
    metadata = saving.result(timeout=60)
    assert "x" in metadata.state_dict_metadata
    assert torch.equal(torchstow.read(ckpt)["x"], torch.arange(4.0))


def test_statefuls_saved_and_restored_in_place_at_any_depth(ckpt: str) -> None:
    model, optimizer, scheduler = _trained()
    torchstow.save(
        {"model": model, "train": {"optim": optimizer, "sched": scheduler, "objs": [Counter(5)]}}, ckpt
    )
    # What was stored is their state dicts, with no pickle.
    stored = torchstow.read(ckpt)
    assert torch.equal(stored["model"]["weight"], model.weight.detach())
    assert stored["train"]["sched"]["last_epoch"] == 1

    torch.manual_seed(1)
    model2 = torch.nn.Linear(4, 2)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    model2(torch.randn(3, 4)).sum().backward()
    optimizer2.step()
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=1, gamma=0.5)
    counter = Counter()
    target = {"model": model2, "train": {"optim": optimizer2, "sched": scheduler2, "objs": [counter]}}
    torchstow.load(target, ckpt)
    assert target["model"] is model2
    assert target["train"]["objs"][0] is counter
    assert counter.n == 5
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(optimizer2.state[model2.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert scheduler2.last_epoch == 1
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_loaded_top_level_values_are_assigned_back(ckpt: str) -> None:
    torchstow.save({"epoch": 3, "history": [1.0, 2.0], "t": torch.ones(2)}, ckpt)
    target: dict[str, Any] = {"epoch": 0, "history": [], "t": torch.zeros(2)}
    t = target["t"]
    torchstow.load(target, ckpt)
    assert target["epoch"] == 3
    assert target["history"] == [1.0, 2.0]
    assert target["t"] is t  # tensors are filled in place
    assert torch.equal(t, torch.ones(2))


def test_meta_targets_are_materialized(ckpt: str) -> None:
    model, _, _ = _trained()
    torchstow.save({"model": model.state_dict()}, ckpt)
    with torch.device("meta"):
        empty = torch.nn.Linear(4, 2)
    target = {"model": empty.state_dict()}
    torchstow.load(target, ckpt)
    assert target["model"]["weight"].device.type == "cpu"
    assert torch.equal(target["model"]["weight"], model.weight.detach())


def test_dcp_planners_and_subclasses(ckpt: str) -> None:
    class CountingLoadPlanner(dcp.DefaultLoadPlanner):
        calls = 0

        def resolve_tensor(self, read_item: Any) -> torch.Tensor:
            CountingLoadPlanner.calls += 1
            return super().resolve_tensor(read_item)

    state = {"w": torch.arange(6.0).reshape(2, 3), "cfg": {"name": "run", "sizes": (1, 2)}}
    torchstow.save(state, ckpt, planner=dcp.DefaultSavePlanner())
    target: dict[str, Any] = {"w": torch.zeros(2, 3), "cfg": {"name": "", "sizes": None}}
    torchstow.load(target, ckpt, planner=CountingLoadPlanner())
    assert CountingLoadPlanner.calls == 1
    assert torch.equal(target["w"], state["w"])
    assert target["cfg"] == state["cfg"]
    assert torchstow.read(ckpt)["cfg"]["sizes"] == (1, 2)


def test_dcp_planner_objects_need_pickle_opt_in(ckpt: str) -> None:
    state = {"obj": Counter(2)}  # Stateful: saved through state_dict(), so no pickle needed
    torchstow.save(state, ckpt, planner=dcp.DefaultSavePlanner())
    with pytest.raises(torchstow.CheckpointException, match="PickleNotAllowedError"):
        torchstow.save({"obj": Path("x")}, ckpt + "2", planner=dcp.DefaultSavePlanner())


def test_tensor_properties_create_from_tensor_matches_dcp() -> None:
    tensor = torch.zeros(2, 3, dtype=torch.float16, requires_grad=True)
    ours = TensorProperties.create_from_tensor(tensor)
    theirs = DcpTensorProperties.create_from_tensor(tensor)
    for name in ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_global_plan_fills_index_hints() -> None:
    props = TensorProperties(torch.float32)
    size = torch.Size([4, 2])

    def shard(row: int) -> WriteItem:
        chunk = ChunkStorageMetadata(torch.Size([row, 0]), torch.Size([2, 2]))
        return WriteItem(
            MetadataIndex("w", chunk.offsets), WriteItemType.SHARD, TensorWriteData(chunk, props, size)
        )

    planner = torchstow.planning.DefaultSavePlanner()
    plans, metadata = planner.create_global_plan([SavePlan([shard(0)]), SavePlan([shard(2)])])
    chunks = metadata.state_dict_metadata["w"].chunks  # type: ignore[union-attr]
    for plan in plans:
        (item,) = plan.items
        assert item.index.index is not None
        assert chunks[item.index.index].offsets == item.index.offset


def test_keywords_reach_only_methods_that_take_them() -> None:
    from torchstow.core.accepted_kwargs import call_with_accepted

    def positional(is_coordinator: bool) -> dict[str, Any]:
        return {}

    def rank_only(is_coordinator: bool, rank: int = -1) -> dict[str, Any]:
        return {"rank": rank}

    def anything(is_coordinator: bool, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    assert call_with_accepted(positional, True, rank=1, world_size=2) == {}
    assert call_with_accepted(rank_only, True, rank=1, world_size=2) == {"rank": 1}
    assert call_with_accepted(anything, True, rank=1, world_size=2) == {"rank": 1, "world_size": 2}
