"""Scenarios that every rank of a gloo worker group runs (see dist_pool.py), for the DCP interop tests.

The model is the same small MLP everywhere, its values a function of the
seed, so any world size knows what a checkpoint must hold.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import torchstow


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def full_values(seed: int) -> dict[str, torch.Tensor]:
    """The parameters of ``make_model(seed)``, as full CPU tensors."""
    return {k: v.detach().clone() for k, v in make_model(seed).state_dict().items()}


class AppState(Stateful):
    """The DCP tutorial's application state: model and optimizer through get/set_state_dict."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def _sharded(seed: int, train: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model under FSDP2 (fully_shard on a CPU mesh) with an Adam optimizer, stepped once if ``train``."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    if train:
        torch.manual_seed(123)
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    out = {f"model.{k}": _full(v).clone() for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for name, value in state.items():
            out[f"optim.{fqn}.{name}"] = _full(value).clone()
    return out


def tutorial_roundtrip(rank: int, world_size: int, path: str) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Save the tutorial's AppState through torchstow.save(checkpoint_id=...), load it into a
    fresh model and optimizer through torchstow.load; the full state before and after."""
    model, optimizer = _sharded(seed=1, train=True)
    before = _full_state(model, optimizer)
    torchstow.save({"app": AppState(model, optimizer)}, checkpoint_id=path)
    model2, optimizer2 = _sharded(seed=2, train=True)
    app = AppState(model2, optimizer2)
    state = {"app": app}
    torchstow.load(state, checkpoint_id=path)
    return before, _full_state(model2, optimizer2), state["app"] is app


def dcp_module_program(rank: int, world_size: int, path: str) -> tuple[bool, bool, bool]:
    """The tutorial's AppState under FSDP2 through ``import torchstow.dcp as dcp``, with
    FileSystemWriter/Reader objects and async_save: whether each load gave back the state."""
    import torchstow.dcp as ts_dcp

    model, optimizer = _sharded(seed=1, train=True)
    before = _full_state(model, optimizer)
    ts_dcp.save(
        {"app": AppState(model, optimizer)}, storage_writer=ts_dcp.FileSystemWriter(path, thread_count=2)
    )
    ts_dcp.async_save({"app": AppState(model, optimizer)}, checkpoint_id=path + "-async").result()
    results = []
    for source in (path, path + "-async"):
        model2, optimizer2 = _sharded(seed=2, train=True)
        ts_dcp.load({"app": AppState(model2, optimizer2)}, storage_reader=ts_dcp.FileSystemReader(source))
        after = _full_state(model2, optimizer2)
        results.append(
            sorted(before) == sorted(after) and all(torch.equal(after[k], v) for k, v in before.items())
        )
    committed = os.path.exists(os.path.join(path, "manifest.json"))
    return results[0], results[1], committed


def recipe_from_stock_dcp(rank: int, world_size: int, path: str) -> tuple[list[float], bool, str]:
    """Stock dcp.save of the tutorial's AppState (lr 0.1), torchstow.load into one with lr 0.5:
    the learning rates after, whether the state came along, and what use_collectives=False says."""
    model, optimizer = _sharded(seed=1, train=True)
    before = _full_state(model, optimizer)
    dcp.save({"app": AppState(model, optimizer)}, checkpoint_id=path)
    model2, optimizer2 = _sharded(seed=2, train=True)
    for group in optimizer2.param_groups:
        group["lr"] = 0.5
    torchstow.load({"app": AppState(model2, optimizer2)}, checkpoint_id=path)
    after = _full_state(model2, optimizer2)
    same = sorted(before) == sorted(after) and all(torch.equal(after[k], v) for k, v in before.items())
    try:
        torchstow.save({"x": torch.ones(1)}, path + "-alone", use_collectives=False)
        refusal = ""
    except ValueError as exc:
        refusal = str(exc)
    return [group["lr"] for group in optimizer2.param_groups], same, refusal


def _dtensor_state(seed: int, shard_dim: int | None) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    placement = [Replicate()] if shard_dim is None else [Shard(shard_dim)]
    return {
        "model": {k: distribute_tensor(v, mesh, placement) for k, v in full_values(seed=3).items()},
        "step": 11,
        "tag": "dcp",
    }


def dcp_save_through_writer(
    rank: int, world_size: int, uri: str, options: dict[str, Any], asynchronous: bool = False
) -> None:
    """Stock dcp.save (or dcp.async_save) with torchstow's writer, parameters sharded on dim 0."""
    writer = torchstow.dcp_storage_writer(uri, storage_options=options)
    if asynchronous:
        dcp.async_save(_dtensor_state(seed=3, shard_dim=0), storage_writer=writer).result()
    else:
        dcp.save(_dtensor_state(seed=3, shard_dim=0), storage_writer=writer)


def dcp_save_stock(rank: int, world_size: int, path: str) -> None:
    """Stock dcp.save with DCP's own FileSystemWriter, parameters sharded on dim 0."""
    dcp.save(_dtensor_state(seed=3, shard_dim=0), checkpoint_id=path)


def load_resharded(rank: int, world_size: int, uri: str, options: dict[str, Any], how: str) -> dict[str, Any]:
    """Load into parameters sharded on the last dim (another sharding than the saver's):
    by torchstow.load or by dcp.load through torchstow's reader. Full values come back."""
    state = _dtensor_state(seed=99, shard_dim=-1)
    state["step"] = 0
    state["tag"] = ""
    if how == "torchstow":
        torchstow.load(state, uri, storage_options=options)
    else:
        dcp.load(state, storage_reader=torchstow.dcp_storage_reader(uri, storage_options=options))
    return {
        "step": state["step"],
        "tag": state["tag"],
        **{k: v.full_tensor() for k, v in state["model"].items()},
    }


def torchstow_with_dcp_planners(rank: int, world_size: int, uri: str) -> dict[str, Any]:
    """torchstow.save and torchstow.load planned by DCP's default planners: saved
    sharded on dim 0, loaded sharded on the last dim. Full values come back."""
    torchstow.save(_dtensor_state(seed=3, shard_dim=0), uri, planner=dcp.DefaultSavePlanner())
    state = _dtensor_state(seed=99, shard_dim=-1)
    state["step"] = 0
    state["tag"] = ""
    torchstow.load(state, uri, planner=dcp.DefaultLoadPlanner())
    return {
        "step": state["step"],
        "tag": state["tag"],
        **{k: v.full_tensor() for k, v in state["model"].items()},
    }


def load_into_meta_fsdp_model(rank: int, world_size: int, uri: str) -> dict[str, Any]:
    """A model built on the meta device and sharded by FSDP2 loads a checkpoint: its
    meta DTensors are replaced by materialized ones on the CPU mesh. Full values come back."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = make_model(seed=0)
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    state = {"model": model.state_dict(), "step": 0, "tag": ""}
    torchstow.load(state, uri)
    loaded = state["model"]
    assert all(isinstance(v, DTensor) and v.device.type == "cpu" for v in loaded.values())
    return {"step": state["step"], "tag": state["tag"], **{k: v.full_tensor() for k, v in loaded.items()}}
