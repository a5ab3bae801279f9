"""``import torchstow.dcp as dcp``: a DCP program beyond the recipe runs unchanged, with
torchstow doing the storage (DCP's constructor arguments, DCP's planners and metadata)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as stock_dcp
from dcp_scenarios import AppState, make_model

import torchstow
import torchstow.dcp as dcp

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01 * (seed + 1))
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_the_namespace_a_dcp_program_uses_is_there() -> None:
    for name in (
        "save",
        "load",
        "async_save",
        "FileSystemWriter",
        "FileSystemReader",
        "DefaultSavePlanner",
        "DefaultLoadPlanner",
        "SavePlanner",
        "LoadPlanner",
        "Stateful",
        "AsyncCheckpointerType",
        "Metadata",
        "StorageWriter",
        "StorageReader",
        "CheckpointException",
    ):
        assert name in dcp.__all__, name
    assert dcp.DefaultLoadPlanner is stock_dcp.DefaultLoadPlanner  # subclasses of DCP's keep working
    assert issubclass(dcp.FileSystemWriter, stock_dcp.StorageWriter)


def test_a_dcp_program_saves_and_loads_by_checkpoint_id(tmp_path: Path) -> None:
    model, optimizer = _trained(0)
    ckpt = str(tmp_path / "step-1")
    committed = dcp.save({"app": AppState(model, optimizer)}, checkpoint_id=ckpt)
    assert isinstance(committed, stock_dcp.Metadata)  # what dcp.save returns
    assert os.path.exists(os.path.join(ckpt, "manifest.json"))  # a torchstow checkpoint
    model2, optimizer2 = _trained(1)
    dcp.load({"app": AppState(model2, optimizer2)}, checkpoint_id=ckpt)
    assert _same_model(model2, model)
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_file_system_writer_and_reader_take_dcps_arguments(tmp_path: Path) -> None:
    model, optimizer = _trained(0)
    ckpt = tmp_path / "ckpt"
    writer = dcp.FileSystemWriter(
        ckpt, single_file_per_rank=True, sync_files=False, thread_count=2, per_thread_copy_ahead=1 << 20
    )
    assert (writer.torchstow_writer.thread_count, writer.torchstow_writer.store.fsync) == (2, False)
    dcp.save({"app": AppState(model, optimizer)}, storage_writer=writer)
    model2, optimizer2 = _trained(1)
    dcp.load({"app": AppState(model2, optimizer2)}, storage_reader=dcp.FileSystemReader(ckpt))
    assert _same_model(model2, model)
    model3, optimizer3 = _trained(2)  # DCP's own load reads through the same reader class
    stock_dcp.load({"app": AppState(model3, optimizer3)}, storage_reader=dcp.FileSystemReader(ckpt))
    assert _same_model(model3, model)


def test_file_system_writer_overwrites_by_default_as_dcps_does(ckpt: str) -> None:
    dcp.save({"w": torch.zeros(3)}, storage_writer=dcp.FileSystemWriter(ckpt))
    dcp.save({"w": torch.ones(3)}, storage_writer=dcp.FileSystemWriter(ckpt))
    assert torch.equal(torchstow.read(ckpt)["w"], torch.ones(3))
    with pytest.raises(torchstow.CheckpointExistsError):
        dcp.save({"w": torch.ones(3)}, storage_writer=dcp.FileSystemWriter(ckpt, overwrite=False))


def test_a_checkpoint_id_re_points_a_given_writer_and_reader(tmp_path: Path) -> None:
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    writer = dcp.FileSystemWriter(first)
    dcp.save({"w": torch.full((2,), 7.0)}, checkpoint_id=second, storage_writer=writer)
    assert not os.path.exists(first)
    target = {"w": torch.zeros(2)}
    dcp.load(target, checkpoint_id=second, storage_reader=dcp.FileSystemReader(first))
    assert torch.equal(target["w"], torch.full((2,), 7.0))


def test_async_save_returns_a_future_of_the_commit(ckpt: str) -> None:
    state = {"w": torch.arange(4.0)}
    future = dcp.async_save(
        state, checkpoint_id=ckpt, async_checkpointer_type=dcp.AsyncCheckpointerType.THREAD
    )
    future.result()
    assert future.done()
    assert torch.equal(torchstow.read(ckpt)["w"], torch.arange(4.0))


def test_loading_is_strict_unless_dcps_planner_allows_a_partial_load(ckpt: str) -> None:
    dcp.save({"w": torch.ones(2)}, checkpoint_id=ckpt)
    target: dict[str, Any] = {"w": torch.zeros(2), "missing": torch.zeros(1)}
    with pytest.raises((RuntimeError, torchstow.CheckpointException), match="missing"):
        dcp.load(target, checkpoint_id=ckpt)
    dcp.load(target, checkpoint_id=ckpt, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(target["w"], torch.ones(2))


def test_a_programs_own_storage_classes_go_to_dcp_unchanged(ckpt: str) -> None:
    """A writer that is not torchstow's (here DCP's own) writes DCP's format, as with DCP."""
    dcp.save({"w": torch.ones(3)}, storage_writer=stock_dcp.FileSystemWriter(ckpt))
    assert os.path.exists(os.path.join(ckpt, ".metadata"))
    target = {"w": torch.zeros(3)}
    dcp.load(target, storage_reader=stock_dcp.FileSystemReader(ckpt))
    assert torch.equal(target["w"], torch.ones(3))


def test_torchstows_own_writer_and_reader_are_taken_too(ckpt: str) -> None:
    dcp.save({"w": torch.ones(3)}, storage_writer=torchstow.storage_writer(ckpt))
    target = {"w": torch.zeros(3)}
    dcp.load(target, storage_reader=torchstow.storage_reader(ckpt))
    assert torch.equal(target["w"], torch.ones(3))


def test_what_torchstow_cannot_honour_is_refused(ckpt: str) -> None:
    with pytest.raises(ValueError, match="extensions"):
        dcp.FileSystemWriter(ckpt, _extensions=[object()])
