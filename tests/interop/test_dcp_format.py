"""Checkpoints written by stock dcp.save, read by torchstow; a crafted .metadata never runs."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

import torchstow
from torchstow.interop.dcp_format import is_dcp_checkpoint, read_dcp_metadata
from torchstow.spi import open_backend

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state() -> dict[str, Any]:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "step": 7,
        "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    }


@pytest.fixture
def stock(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    state = _state()
    path = str(tmp_path / "step-7")
    dcp.save(state, checkpoint_id=path, no_dist=True)
    return path, state


def test_read_info_latest_of_a_stock_checkpoint(stock: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    path, state = stock
    assert is_dcp_checkpoint(path)
    back = torchstow.read(path)
    assert torch.equal(back["model"]["weight"], state["model"]["weight"])
    assert torch.equal(back["half"], state["half"])
    assert back["step"] == 7
    assert back["optim"]["param_groups"][0]["lr"] == state["optim"]["param_groups"][0]["lr"]
    # DCP records integer dict keys as strings in its metadata; so does a read of its checkpoint.
    assert torch.equal(back["optim"]["state"]["0"]["exp_avg"], state["optim"]["state"][0]["exp_avg"])
    info = torchstow.info(path)
    assert info.num_entries == len(read_dcp_metadata(path).state_dict_metadata)
    assert info.nbytes > 0
    assert torchstow.latest(str(tmp_path)) == path


def test_load_subset_of_a_stock_checkpoint(stock: tuple[str, dict[str, Any]]) -> None:
    path, state = stock
    target = {"model": torch.nn.Linear(4, 3), "step": 0}
    torchstow.load(target, path)
    assert torch.equal(target["model"].weight, state["model"]["weight"])
    assert target["step"] == 7
    with pytest.raises(torchstow.StateDictMismatchError, match="missing from the checkpoint: nope"):
        torchstow.load({"nope": torch.zeros(1)}, path)


def test_dcp_load_through_torchstow_reader_of_a_stock_checkpoint(stock: tuple[str, dict[str, Any]]) -> None:
    path, state = stock
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": 0}
    dcp.load(target, storage_reader=torchstow.dcp_storage_reader(path), no_dist=True)
    assert torch.equal(target["model"]["bias"], state["model"]["bias"])
    assert target["step"] == 7


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_crafted_metadata_is_refused_and_never_runs(stock: tuple[str, dict[str, Any]], where: str) -> None:
    path, _ = stock
    marker = os.path.join(os.path.dirname(path), "ran")
    if where == "top":
        payload: Any = _RunsCode(marker)
    else:  # a genuine Metadata with the exploit inside its planner data
        with open(os.path.join(path, ".metadata"), "rb") as f:
            payload = pickle.load(f)
        payload.planner_data = {"x": _RunsCode(marker)}
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(payload, f)
    for call in (torchstow.info, torchstow.read, lambda p: torchstow.load({"step": 0}, p)):
        with pytest.raises((torchstow.CorruptCheckpointError, torchstow.CheckpointException)) as info:
            call(path)
        assert "not allowed" in str(info.value)
    assert not os.path.exists(marker)


def test_truncated_metadata_is_corrupt(stock: tuple[str, dict[str, Any]]) -> None:
    path, _ = stock
    meta = os.path.join(path, ".metadata")
    with open(meta, "rb") as f:
        data = f.read()
    with open(meta, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(torchstow.CorruptCheckpointError):
        torchstow.info(path)


def test_not_a_checkpoint_is_still_not_found(tmp_path: Path) -> None:
    assert not is_dcp_checkpoint(str(tmp_path))
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.read(str(tmp_path / "nothing"))


def test_a_pickled_object_of_a_stock_checkpoint_needs_allow_pickle(tmp_path: Path) -> None:
    """DCP unpickles every object it stored (an io.BytesIO of loader state is its own
    example): with allow_pickle=True they read; without, the refusal names allow_pickle
    (both used to fail as CorruptCheckpointError)."""
    path = str(tmp_path / "step-1")
    dcp.save({"loader": io.BytesIO(b"loader state"), "step": 1}, checkpoint_id=path, no_dist=True)
    with pytest.raises(torchstow.PickleNotAllowedError, match="allow_pickle=True"):
        torchstow.read(path)
    assert torchstow.read(path, allow_pickle=True)["loader"].getvalue() == b"loader state"
    target: dict[str, Any] = {"loader": io.BytesIO(), "step": 0}
    torchstow.load(target, path, allow_pickle=True)
    assert target["loader"].getvalue() == b"loader state" and target["step"] == 1
    through_dcp: dict[str, Any] = {"loader": io.BytesIO(), "step": 0}
    dcp.load(through_dcp, storage_reader=torchstow.dcp_storage_reader(path, allow_pickle=True), no_dist=True)
    assert through_dcp["loader"].getvalue() == b"loader state"


def test_storage_extensions_are_refused_by_name(stock: tuple[str, dict[str, Any]]) -> None:
    path, _ = stock
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        info.transform_descriptors = ["zstd"]
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(torchstow.FormatVersionError, match=r"zstd.*dcp\.load"):
        torchstow.read(path)


def test_the_backends_own_reader_reads_a_stock_checkpoint(stock: tuple[str, dict[str, Any]]) -> None:
    """Format detection is the backend reader's: a plugin's reader, and a wrapper backend
    around it (faulty+), load a stock DCP checkpoint with no wrapper added by the API."""
    path, state = stock
    reader = open_backend(path).storage_reader(path)
    target = {"model": torch.nn.Linear(4, 3).state_dict(), "step": 0}
    torchstow.load(target, storage_reader=reader, no_dist=True)
    assert torch.equal(target["model"]["weight"], state["model"]["weight"]) and target["step"] == 7
    wrapped = {"half": torch.zeros(2, 3, dtype=torch.bfloat16)}
    torchstow.load(wrapped, f"faulty+file://{path}", no_dist=True)
    assert torch.equal(wrapped["half"], state["half"])


def test_a_pickled_object_is_skipped_by_a_convert_to_safetensors(tmp_path: Path) -> None:
    """safetensors keeps no object but strings, which need no pickle: a loader's io.BytesIO
    (torchtitan's train state has them) is reported and skipped, not the whole conversion
    refused with advice to pass an allow_pickle that convert does not take."""
    path = str(tmp_path / "step-1")
    state = {"loader": io.BytesIO(b"x"), "w": torch.ones(2), "note": "kept"}
    dcp.save(state, checkpoint_id=path, no_dist=True)
    report = torchstow.convert(path, tmp_path / "hf", to="safetensors")
    assert [key for key, _ in report.skipped] == ["loader"]
    with safe_open(str(tmp_path / "hf" / "model-00001-of-00001.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
        assert list(f.keys()) == ["w"] and torch.equal(f.get_tensor("w"), torch.ones(2))


def test_a_pickled_object_refused_by_convert_says_what_to_do(tmp_path: Path) -> None:
    """The reader's advice (pass allow_pickle=True) names an option convert does not take."""
    path = str(tmp_path / "step-1")
    dcp.save({"loader": io.BytesIO(b"x"), "w": torch.ones(2)}, checkpoint_id=path, no_dist=True)
    for to in ("torchstow", "torch"):
        with pytest.raises(torchstow.PickleNotAllowedError, match="convert never unpickles") as info:
            torchstow.convert(path, tmp_path / to, to=to)
        assert "loader" in str(info.value) and "--keys" in str(info.value)
