"""Staging, replication, async saves and checkpointers across real gloo processes.

Each scenario below (a ``scenario_*`` function) runs on every rank of the
session's worker pool of 2 or 4 gloo processes (see ``dist_pool``), with a
fresh directory and a spare port, and must pass on every rank.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import namedtuple
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

import torchstow
from dist_pool import free_port
from torchstow import CheckpointException
from torchstow.checkpointing import (
    BarrierConfig,
    CheckpointerConfig,
    ReplicationStager,
    StateDictStager,
    TCPStoreBarrier,
    WriterHook,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from torchstow.core.planning import DefaultSavePlanner

Pair = namedtuple("Pair", "first second")

TWO_RANKS = [
    "scenario_dtensor_staging",
    "scenario_replication",
    "scenario_replication_timeout",
    "scenario_async_save_across_ranks",
    "scenario_async_save_fails_as_one",
    "scenario_async_save_fails_as_one_planner_without_cache",
    "scenario_async_save_with_cancelled_staging_fails_as_one",
    "scenario_checkpointer_dist_barrier",
    "scenario_tcpstore_barrier",
    "scenario_async_checkpointer_across_ranks",
]
FOUR_RANKS = ["scenario_replication", "scenario_replication_needs_even_group"]


@dataclass
class Scenario:
    """What a scenario function receives on each rank."""

    rank: int
    world_size: int
    root: str  # a directory shared by the ranks, fresh for this scenario
    spare_port: int  # a free port the scenario may use (the same on every rank)


def run_scenario(rank: int, world_size: int, name: str, root: str, spare_port: int) -> None:
    """Run ``scenario_<name>`` on this rank, then wait for the others."""
    globals()[name](Scenario(rank, world_size, root, spare_port))
    dist.barrier()


# --- helpers used inside the processes ---------------------------------------------------


def _mesh(world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def _sharded(world_size: int, mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(torch.arange(world_size * 4.0).reshape(world_size * 2, 2), mesh, [Shard(0)])


def _state(rank: int, world_size: int, mesh: Any) -> dict[str, Any]:
    base = torch.arange(12.0) + 100 * rank
    return {
        "model": {
            "w": base,
            "view": base[2:6],
            "big": torch.full((300, 1024), float(rank)),  # over 1 MiB: travels on its own
            "dt": _sharded(world_size, mesh),
        },
        "pair": Pair(torch.tensor([rank]), "tag"),
        "step": 10 + rank,
        "names": ["a", "b"],
        "empty": torch.empty(0, 3),
    }


def _check_partner_state(got: dict[str, Any], partner: int, world_size: int, mesh: Any) -> None:
    from torch.distributed.tensor import DTensor

    model = got["model"]
    assert torch.equal(model["w"], torch.arange(12.0) + 100 * partner)
    assert torch.equal(model["view"], model["w"][2:6])
    assert model["view"].untyped_storage().data_ptr() == model["w"].untyped_storage().data_ptr()
    assert model["view"].storage_offset() == 2
    assert torch.equal(model["big"], torch.full((300, 1024), float(partner)))
    mine = _sharded(world_size, mesh)
    assert isinstance(model["dt"], DTensor)
    assert model["dt"].placements == mine.placements
    assert model["dt"].shape == mine.shape
    assert model["dt"].device_mesh == mine.device_mesh
    expected_shard = torch.arange(world_size * 4.0).reshape(world_size * 2, 2)[2 * partner : 2 * partner + 2]
    assert torch.equal(model["dt"].to_local(), expected_shard)
    assert isinstance(got["pair"], Pair)
    assert torch.equal(got["pair"].first, torch.tensor([partner]))
    assert got["pair"].second == "tag"
    assert got["step"] == 10 + partner
    assert got["names"] == ["a", "b"]
    assert got["empty"].shape == (0, 3)


class ManifestsSeenHook(WriterHook):
    """Records, at post-commit time, whether the one checkpoint at the path is committed (to a file)."""

    def __init__(self, root: str, rank: int, world_size: int) -> None:
        self.root, self.rank, self.world_size = root, rank, world_size

    def post_commit(self, path: str, **kwargs: Any) -> None:
        seen = os.path.exists(f"{path}/manifest.json")
        with open(os.path.join(self.root, f"post-{self.rank}.json"), "w") as f:
            json.dump({"seen": seen, "kwargs": kwargs, "pid": os.getpid()}, f)


# --- scenarios ---------------------------------------------------------------------------


def scenario_dtensor_staging(s: Scenario) -> None:
    from torch.distributed.tensor import DTensor

    mesh = _mesh(s.world_size)
    dt = _sharded(s.world_size, mesh)
    stager = StateDictStager()
    staged = stager.stage({"dt": dt})["dt"]
    assert isinstance(staged, DTensor)
    assert staged._spec is dt._spec
    assert staged.to_local().device.type == "cpu"
    assert torch.equal(staged.to_local(), dt.to_local())
    assert staged.to_local().untyped_storage().data_ptr() != dt.to_local().untyped_storage().data_ptr()
    pointer = staged.to_local().data_ptr()
    dt.to_local().add_(1)
    again = stager.stage({"dt": dt})["dt"]
    assert again.to_local().data_ptr() == pointer  # the cached buffer
    assert torch.equal(again.to_local(), dt.to_local())
    assert stager.cache_stats() == (1, dt.to_local().nbytes)
    assert not staged.to_local().is_shared()
    for options in ({"share_memory": True}, {"share_memory": True, "pin_memory": True}):
        shared = StateDictStager(**options)
        local = shared.stage({"dt": dt})["dt"].to_local()
        assert local.is_shared() and local.untyped_storage().is_shared()
        assert torch.equal(local, dt.to_local())
        shared.close()


def scenario_replication(s: Scenario) -> None:
    mesh = _mesh(s.world_size)
    partner = (s.rank + s.world_size // 2) % s.world_size
    custom = os.path.join(s.root, "replicas")
    for storage_dir in (None, custom):
        stager = ReplicationStager(timeout=60, storage_dir=storage_dir)
        assert stager.partner_rank == partner
        if storage_dir is None:
            assert stager.storage_dir.startswith(tempfile.gettempdir())
            assert os.path.isdir(stager.storage_dir)
        else:
            assert stager.storage_dir == custom
        state = _state(s.rank, s.world_size, mesh)
        got = stager.stage(state)
        _check_partner_state(got, partner, s.world_size, mesh)

        uri = stager.persisted_uri(s.rank, partner)
        assert uri.startswith(stager.storage_dir)
        persisted = torchstow.read(uri)
        assert torch.equal(persisted["model"]["w"], torch.arange(12.0) + 100 * partner)
        assert torch.equal(persisted["model"]["dt"], got["model"]["dt"].to_local())
        assert torchstow.info(uri).user_metadata == {"replica_of_rank": partner, "kept_by_rank": s.rank}

        # A second round sends the new values; the persisted copy is replaced.
        state["model"]["w"].add_(1000)
        got = stager.stage(state)
        assert torch.equal(got["model"]["w"], torch.arange(12.0) + 100 * partner + 1000)
        assert torch.equal(torchstow.read(uri, keys="model.w")["model"]["w"], got["model"]["w"])
        stager.close()


def scenario_replication_timeout(s: Scenario) -> None:
    stager = ReplicationStager(timeout=1.0, storage_dir=s.root)
    if s.rank == 0:  # rank 1 never calls stage
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="partner rank 1 did not exchange"):
            stager.stage({"x": torch.ones(3)})
        assert time.monotonic() - start < 10
        with pytest.raises(RuntimeError, match="failed earlier"):
            stager.stage({"x": torch.ones(3)})
    dist.barrier()
    stager.close()


def scenario_replication_needs_even_group(s: Scenario) -> None:
    group = dist.new_group([0, 1, 2])
    if s.rank < 3:
        with pytest.raises(ValueError, match="even number of ranks"):
            ReplicationStager(group, timeout=5)


def scenario_async_save_across_ranks(s: Scenario) -> None:
    own = f"rank{s.rank}"
    sd: dict[str, Any] = {"shared": torch.arange(1000.0), own: torch.full((10,), float(s.rank)), "step": 0}
    saves = []
    for step in range(3):
        sd["shared"].add_(1)
        sd[own].add_(1)
        sd["step"] = step
        save = torchstow.async_save(sd, os.path.join(s.root, f"step-{step}"))
        save.staged()
        # Training goes on with collectives on the default group while the save commits.
        for _ in range(20):
            t = torch.ones(4)
            dist.all_reduce(t)
            assert t[0].item() == s.world_size
        saves.append(save)
    committed = [save.result(timeout=60).committed_at for save in saves]
    assert committed == sorted(committed)
    for step in range(3):
        loaded = torchstow.read(os.path.join(s.root, f"step-{step}"))
        assert torch.equal(loaded["shared"], torch.arange(1000.0) + step + 1)
        for rank in range(s.world_size):
            assert torch.equal(loaded[f"rank{rank}"], torch.full((10,), float(rank + step + 1)))
        assert loaded["step"] == step


def scenario_async_save_fails_as_one(s: Scenario) -> None:
    sd: dict[str, Any] = {"x": torch.ones(3)}
    if s.rank == 1:
        sd["lock"] = threading.Lock()  # cannot be staged (copied)
    save = torchstow.async_save(sd, os.path.join(s.root, "ckpt"))
    with pytest.raises(CheckpointException) as info:
        save.result(timeout=60)
    assert set(info.value.failures) == {1}
    assert isinstance(info.value.failures[1][0], TypeError)
    assert not os.path.exists(os.path.join(s.root, "ckpt", "manifest.json"))
    # The next save works.
    ok = torchstow.async_save({"x": torch.ones(3)}, os.path.join(s.root, "ok"))
    assert ok.result(timeout=60).state_dict_metadata["x"].size == (3,)


def scenario_async_save_fails_as_one_planner_without_cache(s: Scenario) -> None:
    # Rank 1's save fails before the protocol (it saves through a stand-in with the default
    # planner) while rank 0 saves with a planner that does not cache plans: both must still
    # run the same collectives and raise rank 1's failure, not lose each other.
    sd: dict[str, Any] = {"x": torch.ones(3)}
    if s.rank == 1:
        sd["lock"] = threading.Lock()  # cannot be staged (copied)
    planner = DefaultSavePlanner(enable_plan_caching=False)
    save = torchstow.async_save(sd, os.path.join(s.root, "ckpt"), planner=planner, timeout=20)
    with pytest.raises(CheckpointException) as info:
        save.result(timeout=60)
    assert set(info.value.failures) == {1}
    assert isinstance(info.value.failures[1][0], TypeError)
    ok = torchstow.async_save({"x": torch.ones(3)}, os.path.join(s.root, "ok"), planner=planner)
    assert ok.result(timeout=60).state_dict_metadata["x"].size == (3,)


class CancellingStager:
    """A stager of its own whose staging is cancelled (its executor shut down with
    ``cancel_futures=True``, say) after the save was queued."""

    def __init__(self) -> None:
        self.pending: Future[Any] = Future()

    def stage(self, state_dict: Any) -> Future[Any]:
        return self.pending

    def close(self) -> None:
        self.pending.cancel()


def scenario_async_save_with_cancelled_staging_fails_as_one(s: Scenario) -> None:
    sd: dict[str, Any] = {"x": torch.ones(3)}
    stager = CancellingStager() if s.rank == 1 else None
    save = torchstow.async_save(sd, os.path.join(s.root, "ckpt"), stager=stager, timeout=20)
    if stager is not None:
        stager.close()
    with pytest.raises(CheckpointException) as info:
        save.result(timeout=60)
    assert set(info.value.failures) == {1}
    ok = torchstow.async_save({"x": torch.ones(3)}, os.path.join(s.root, "ok"))
    assert ok.result(timeout=60).state_dict_metadata["x"].size == (3,)


def scenario_checkpointer_dist_barrier(s: Scenario) -> None:
    hook = ManifestsSeenHook(s.root, s.rank, s.world_size)
    config = CheckpointerConfig(barrier_config=BarrierConfig("dist_barrier"))
    checkpointer = make_sync_checkpointer(config, commit_hook=hook)
    if s.rank == 1:
        time.sleep(0.5)  # rank 0 must wait for this rank at the barrier
    path = os.path.join(s.root, "ckpt")
    checkpointer.save(path, {f"v{s.rank}": torch.full((4,), float(s.rank))}, step=7)
    with open(os.path.join(s.root, f"post-{s.rank}.json")) as f:
        record = json.load(f)
    assert record["seen"] is True
    assert record["kwargs"] == {"step": 7}
    loaded = checkpointer.load(path)  # one checkpoint holding every rank's keys
    for rank in range(s.world_size):
        assert torch.equal(loaded[f"v{rank}"], torch.full((4,), float(rank)))
    checkpointer.close()


def scenario_tcpstore_barrier(s: Scenario) -> None:
    barrier = TCPStoreBarrier(s.rank, s.world_size, tcpstore_port=s.spare_port, timeout_secs=1.0)
    if s.rank == 1:
        time.sleep(0.3)
    start = time.monotonic()
    barrier.execute_barrier()
    if s.rank == 0:
        assert time.monotonic() - start >= 0.2  # it waited for rank 1
    barrier.execute_barrier()  # numbered: a barrier object is reused
    if s.rank == 0:  # rank 1 does not come this time
        with pytest.raises(TimeoutError, match="1 of 2 ranks arrived"):
            barrier.execute_barrier()
    dist.barrier()


def scenario_async_checkpointer_across_ranks(s: Scenario) -> None:
    barrier = BarrierConfig("tcp_store", {"tcpstore_port": s.spare_port, "timeout_secs": 60})
    hook = ManifestsSeenHook(s.root, s.rank, s.world_size)
    checkpointer = make_async_checkpointer(CheckpointerConfig(barrier_config=barrier), commit_hook=hook)
    try:
        path = os.path.join(s.root, "ckpt")
        staging, write = checkpointer.save(path, {f"v{s.rank}": torch.full((1000,), float(s.rank))}, step=3)
        staging.result(timeout=60)
        write.result(timeout=60)
        with open(os.path.join(s.root, f"post-{s.rank}.json")) as f:
            record = json.load(f)
        assert record["seen"] is True  # post_commit ran after the commit
        assert record["kwargs"] == {"step": 3}
        assert record["pid"] == checkpointer.process.pid != os.getpid()
        loaded = checkpointer.load(path)
        for rank in range(s.world_size):
            assert torch.equal(loaded[f"v{rank}"], torch.full((1000,), float(rank)))
    finally:
        checkpointer.close()


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_ranks(pools: Any, tmp_path: Any, name: str) -> None:
    pools(2).run(run_scenario, name, str(tmp_path), free_port())


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_ranks(pools: Any, tmp_path: Any, name: str) -> None:
    pools(4).run(run_scenario, name, str(tmp_path), free_port(), timeout=180)
