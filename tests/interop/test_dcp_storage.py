"""torchstow's backends under stock dcp.save/dcp.load/dcp.async_save (single process)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import torchstow
from manifest_json import manifest_doc

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled", "ignore:torch.distributed is unavailable"
)


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.int32)},
        "step": 12,
        "names": ["a", "b"],
    }


def test_dcp_save_commits_a_torchstow_checkpoint(ckpt: str) -> None:
    state = _state()
    writer = torchstow.dcp_storage_writer(ckpt)
    assert isinstance(writer, dcp.StorageWriter)
    dcp.save(state, storage_writer=writer, no_dist=True)
    files = os.listdir(ckpt)
    assert "manifest.json" in files
    assert not any(name.endswith(".distcp") or name == ".metadata" for name in files)
    manifest = manifest_doc(ckpt)
    assert manifest["format"] == "torchstow"
    assert manifest["entries"]["model.w"]["crc32c"]  # checksummed
    back = torchstow.read(ckpt)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["step"] == 12
    assert back["names"] == ["a", "b"]


def test_dcp_load_through_reader(ckpt: str) -> None:
    state = _state()
    dcp.save(state, storage_writer=torchstow.dcp_storage_writer(ckpt), no_dist=True)
    reader = torchstow.dcp_storage_reader(ckpt)
    assert isinstance(reader, dcp.StorageReader)
    target = {
        "model": {"w": torch.zeros(3, 4), "b": torch.zeros(3, dtype=torch.int32)},
        "step": 0,
        "names": [],
    }
    dcp.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["b"], state["model"]["b"])
    assert target["step"] == 12
    assert target["names"] == ["a", "b"]


def test_torchstow_checkpoint_read_by_dcp_load(ckpt: str) -> None:
    model = torch.nn.Linear(4, 2)
    torchstow.save({"model": model, "epoch": 4, "cfg": {"lr": 0.5}}, ckpt)
    fresh = torch.nn.Linear(4, 2)
    target: dict[str, Any] = {"model": fresh, "epoch": 0, "cfg": {"lr": 0.0}}
    dcp.load(target, storage_reader=torchstow.dcp_storage_reader(ckpt), no_dist=True)
    assert torch.equal(fresh.weight, model.weight)
    assert target["epoch"] == 4
    assert target["cfg"] == {"lr": 0.5}


def test_dcp_async_save_through_writer(ckpt: str) -> None:
    state = _state()
    future = dcp.async_save(state, storage_writer=torchstow.dcp_storage_writer(ckpt), no_dist=True)
    future.result()
    assert torch.equal(torchstow.read(ckpt)["model"]["w"], state["model"]["w"])


def test_existing_checkpoint_is_kept_unless_overwrite(ckpt: str) -> None:
    dcp.save({"x": torch.ones(1)}, storage_writer=torchstow.dcp_storage_writer(ckpt), no_dist=True)
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.zeros(1)}, storage_writer=torchstow.dcp_storage_writer(ckpt), no_dist=True)
    assert isinstance(info.value.failures[0][0], torchstow.CheckpointExistsError)
    dcp.save(
        {"x": torch.zeros(1)}, storage_writer=torchstow.dcp_storage_writer(ckpt, overwrite=True), no_dist=True
    )
    assert torchstow.read(ckpt)["x"].item() == 0.0


class Opaque:
    """A value only full pickle stores."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_objects_stay_opaque_bytes_behind_the_restricted_loader(ckpt: str) -> None:
    dcp.save(
        {"obj": Opaque(3), "x": torch.ones(1)},
        storage_writer=torchstow.dcp_storage_writer(ckpt),
        no_dist=True,
    )
    with open(os.path.join(ckpt, "manifest.json")) as f:
        assert json.load(f)["entries"]["obj"]["encoding"] == "pickle"
    with pytest.raises(torchstow.PickleNotAllowedError):
        torchstow.read(ckpt)
    target: dict[str, Any] = {"obj": None, "x": torch.zeros(1)}
    with pytest.raises(CheckpointException) as info:
        dcp.load(target, storage_reader=torchstow.dcp_storage_reader(ckpt), no_dist=True)
    assert isinstance(info.value.failures[0][0], torchstow.PickleNotAllowedError)
    assert target["obj"] is None
    dcp.load(target, storage_reader=torchstow.dcp_storage_reader(ckpt, allow_pickle=True), no_dist=True)
    assert target["obj"].value == 3
    assert torchstow.read(ckpt, allow_pickle=True)["obj"].value == 3


def test_checkpoint_id_rebinds_the_writer(tmp_path: Path) -> None:
    writer = torchstow.dcp_storage_writer(str(tmp_path / "first"))
    dcp.save(
        {"x": torch.ones(1)}, storage_writer=writer, checkpoint_id=str(tmp_path / "second"), no_dist=True
    )
    assert torchstow.info(str(tmp_path / "second")).num_entries == 1
    assert not (tmp_path / "first" / "manifest.json").exists()


def test_plugin_backend_under_dcp_and_its_failures(tmp_path: Path) -> None:
    # faulty+ is a plugin that wraps another backend's writer and reader (docs/faulty.md).
    uri = f"faulty+file://{tmp_path}/ok"
    dcp.save({"w": torch.ones(3), "s": 2}, storage_writer=torchstow.dcp_storage_writer(uri), no_dist=True)
    target: dict[str, Any] = {"w": torch.zeros(3), "s": 0}
    dcp.load(target, storage_reader=torchstow.dcp_storage_reader(uri), no_dist=True)
    assert torch.equal(target["w"], torch.ones(3))
    assert target["s"] == 2
    failing = f"faulty+file://{tmp_path}/bad?fail=write_data&exc=OSError"
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(3)}, storage_writer=torchstow.dcp_storage_writer(failing), no_dist=True)
    assert isinstance(info.value.failures[0][0], OSError)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_dcp_reads_a_whole_torchstow_checkpoint_with_its_nesting(ckpt: str) -> None:
    # DCP's own whole-checkpoint read (behind its format_utils) rebuilds the nesting from the
    # metadata's mappings: dict keys as DCP spells them (strings), list items by index.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    torchstow.save({"opt": {"state": {0: {"s": torch.ones(2)}}, "lr": 0.1}, "n": [torch.zeros(1)]}, ckpt)
    back = _load_state_dict_from_keys(storage_reader=torchstow.dcp_storage_reader(ckpt))
    assert torch.equal(back["opt"]["state"]["0"]["s"], torch.ones(2))
    assert back["opt"]["lr"] == 0.1
    assert isinstance(back["n"], list)
    assert torch.equal(back["n"][0], torch.zeros(1))
