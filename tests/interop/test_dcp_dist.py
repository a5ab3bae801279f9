"""DCP interop across real gloo processes: the tutorial flow (FSDP2 on CPU) through
torchstow.save/load with DCP's keywords, dcp.save through torchstow's writer and stock
dcp.save, each loaded at other world sizes and shardings by torchstow and by dcp.load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dcp_scenarios import (
    dcp_module_program,
    dcp_save_stock,
    dcp_save_through_writer,
    full_values,
    load_into_meta_fsdp_model,
    load_resharded,
    recipe_from_stock_dcp,
    torchstow_with_dcp_planners,
    tutorial_roundtrip,
)

import torchstow

pytestmark = pytest.mark.slow


def _check_full(got: dict[str, Any]) -> None:
    assert got["step"] == 11
    assert got["tag"] == "dcp"
    for key, value in full_values(seed=3).items():
        assert torch.equal(got[key], value), key


def test_tutorial_app_state_with_fsdp2(pools: Any, tmp_path: Path) -> None:
    before, after, same_object = pools(2).run(tutorial_roundtrip, str(tmp_path / "step-1"))[0]
    assert same_object  # restored in place, through load_state_dict
    assert sorted(before) == sorted(after)
    assert any(".exp_avg" in key for key in before)  # the optimizer state came along
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_a_dcp_program_runs_through_torchstow_dcp_with_fsdp2(pools: Any, tmp_path: Path) -> None:
    # import torchstow.dcp as dcp: FileSystemWriter/Reader objects and async_save, on 2 ranks.
    for through_writer, through_async, committed in pools(2).run(
        dcp_module_program, str(tmp_path / "step-1")
    ):
        assert through_writer and through_async
        assert committed  # a torchstow checkpoint, one manifest for both ranks


def test_recipe_saved_by_stock_dcp_loads_with_its_hyperparameters(pools: Any, tmp_path: Path) -> None:
    # The tutorial's AppState under FSDP2, saved by stock dcp.save (param_groups.0.lr as flat
    # keys): torchstow.load restores lr 0.1 over the target's 0.5, with every tensor of the state.
    # use_collectives=False cannot commit one manifest for two ranks: refused, nothing written.
    for lrs, same, refusal in pools(2).run(recipe_from_stock_dcp, str(tmp_path / "step-1")):
        assert lrs == [0.1]
        assert same
        assert "use_collectives=False" in refusal and "2 ranks" in refusal
    assert not (tmp_path / "step-1-alone").exists()


@pytest.mark.parametrize("how", ["torchstow", "dcp"])
def test_dcp_save_through_torchstow_writer_reshards(pools: Any, tmp_path: Path, how: str) -> None:
    uri = str(tmp_path / "ckpt")
    pools(2).run(dcp_save_through_writer, uri, {})
    assert (tmp_path / "ckpt" / "manifest.json").is_file()
    # A third world size (this process) reads it whole, and two ranks load it resharded.
    back = torchstow.read(uri)
    _check_full({"step": back["step"], "tag": back["tag"], **back["model"]})
    _check_full(pools(2).run(load_resharded, uri, {}, how)[1])


def test_stock_dcp_checkpoint_loads_at_other_world_sizes(pools: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "stock")
    pools(2).run(dcp_save_stock, path)
    assert (tmp_path / "stock" / ".metadata").is_file()
    _check_full(pools(2).run(load_resharded, path, {}, "torchstow")[0])
    single = {"model": {k: torch.zeros_like(v) for k, v in full_values(seed=3).items()}, "step": 0, "tag": ""}
    torchstow.load(single, path)
    _check_full({"step": single["step"], "tag": single["tag"], **single["model"]})


def test_dcp_planners_plan_a_sharded_torchstow_save_and_load(pools: Any, tmp_path: Path) -> None:
    uri = str(tmp_path / "planned")
    for got in pools(2).run(torchstow_with_dcp_planners, uri):
        _check_full(got)
    back = torchstow.read(uri)
    assert torch.equal(back["model"]["0.weight"], full_values(seed=3)["0.weight"])


def test_dcp_async_save_through_torchstow_writer(pools: Any, tmp_path: Path) -> None:
    uri = str(tmp_path / "async")
    pools(2).run(dcp_save_through_writer, uri, {}, True)
    back = torchstow.read(uri)
    _check_full({"step": back["step"], "tag": back["tag"], **back["model"]})


def test_meta_fsdp_model_is_materialized_on_load(pools: Any, tmp_path: Path) -> None:
    uri = str(tmp_path / "for-meta")
    pools(2).run(dcp_save_through_writer, uri, {})
    for got in pools(2).run(load_into_meta_fsdp_model, uri):
        _check_full(got)
