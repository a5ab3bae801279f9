"""The checkpointer family across real gloo ranks: every write is ONE torchstow checkpoint at path.

Sync checkpointer, async checkpointer (through its writer process) and a bare
CheckpointProcess built with PyTorch's constructor, on 1 and 2 ranks: the
result is an ordinary checkpoint that torchstow.read and latest() find, holding
the global DTensors (replicated values stored once), with each rank's
pre_commit before the commit and post_commit after it; it reshards on load
into another world size. A failure on one rank fails every rank and commits
nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import torchstow
from dist_pool import free_port
from state_helpers import check_stored_once
from torchstow import CheckpointException
from torchstow.checkpointing import (
    BarrierConfig,
    CheckpointerConfig,
    CheckpointProcess,
    CheckpointProcessConfig,
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    RankInfo,
    TCPStoreBarrier,
    WriterHook,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from torchstow.format.files import is_chunk_table

pytestmark = pytest.mark.slow

ROWS = 4  # rows of the sharded tensor per saving rank


class OrderHook(WriterHook):
    """Logs each hook call of one rank, with whether the manifest at the path existed then."""

    def __init__(self, log: str, rank: int) -> None:
        self.log, self.rank = log, rank

    def _record(self, event: str, path: str, kwargs: dict[str, Any]) -> None:
        committed = os.path.exists(os.path.join(path, "manifest.json"))
        with open(self.log, "a") as f:
            f.write(json.dumps({"event": event, "committed": committed, "kwargs": kwargs}) + "\n")

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self._record("pre_commit", path, kwargs)
        if kwargs.get("fail_on") == self.rank:
            raise ValueError(f"rank {self.rank} refuses")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        self._record("post_commit", path, kwargs)


def barrier_writer(rank_info: RankInfo, port: int, hook: WriterHook) -> CheckpointWriter:
    """PyTorch-style writer init function for the writer process: a TCPStore barrier of its own."""
    barrier = TCPStoreBarrier(rank_info.global_rank, rank_info.global_world_size, tcpstore_port=port)
    return CheckpointWriter(CheckpointWriterConfig(), rank_info, barrier, hook)


def _full(saved_ws: int) -> torch.Tensor:
    return torch.arange(saved_ws * ROWS * 3.0).reshape(saved_ws * ROWS, 3)


def _state(rank: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    return {
        "model": {
            "sharded": distribute_tensor(_full(world_size), mesh, [Shard(0)]),
            "replicated": distribute_tensor(torch.arange(6.0), mesh, [Replicate()]),
            "plain": torch.arange(5.0),  # the same on every rank: stored once
        },
        f"rank{rank}": torch.full((2,), float(rank)),
        "step": 3,
    }


def save_scenario(rank: int, world_size: int, root: str, port: int, mode: str) -> None:
    """One write of every rank's state to ``<root>/step-3`` with the checkpointer ``mode`` names."""
    path = os.path.join(root, "step-3")
    hook = OrderHook(os.path.join(root, f"events-{rank}.jsonl"), rank)
    barrier = BarrierConfig("tcp_store", {"tcpstore_port": port, "timeout_secs": 60})
    config = CheckpointerConfig(barrier_config=barrier)
    sd = _state(rank, world_size)
    if mode == "sync":
        with make_sync_checkpointer(config, commit_hook=hook) as sync:
            assert sync.save(path, sd, step=3) is None
    elif mode == "async":
        with make_async_checkpointer(config, commit_hook=hook) as checkpointer:
            staging, write = checkpointer.save(path, sd, step=3)
            staging.result(timeout=120)
            write.result(timeout=120)
    else:  # a bare writer process, built with PyTorch's constructor; unstaged tensors
        process = CheckpointProcess(
            rank_info=RankInfo(rank, world_size),
            config=CheckpointProcessConfig(subprocess_init_timeout_secs=120),
            subprocess_init_fn=None,
            subprocess_init_args=(),
            checkpoint_writer_init_fn=barrier_writer,
            checkpoint_writer_init_args={"port": port, "hook": hook},
        )
        try:
            process.write(sd, path, step=3).result(timeout=120)
        finally:
            process.close()


def failing_scenario(rank: int, world_size: int, root: str, port: int) -> list[str]:
    """Rank 1's pre_commit fails: every rank raises, nothing is committed, the next write works."""
    hook = OrderHook(os.path.join(root, f"events-{rank}.jsonl"), rank)
    config = CheckpointerConfig(barrier_config=BarrierConfig("tcp_store", {"tcpstore_port": port}))
    with make_sync_checkpointer(config, commit_hook=hook) as checkpointer:
        sd = {"x": torch.ones(3), f"rank{rank}": torch.zeros(2)}
        with pytest.raises(CheckpointException) as info:
            checkpointer.save(os.path.join(root, "bad"), sd, fail_on=1)
        assert set(info.value.failures) == {1}
        assert isinstance(info.value.failures[1][0], ValueError)
        checkpointer.save(os.path.join(root, "good"), sd)
    return sorted(os.listdir(os.path.join(root, "bad")))


def load_scenario(rank: int, world_size: int, path: str, saved_ws: int) -> None:
    """Read the checkpoint saved by ``saved_ws`` ranks into DTensors sharded another way."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    target = {"model": {"sharded": distribute_tensor(torch.zeros(saved_ws * ROWS, 3), mesh, [Shard(1)])}}
    loaded, missing = CheckpointReader(RankInfo(rank, world_size)).read(path, target)
    assert missing == []
    sharded = loaded["model"]["sharded"]
    assert sharded is target["model"]["sharded"]  # filled in place
    assert torch.equal(sharded.full_tensor(), _full(saved_ws))
    # A None placeholder stands for the whole stored subtree.
    whole, _ = CheckpointReader(RankInfo(rank, world_size)).read(path, {"model": None, "step": None})
    assert torch.equal(whole["model"]["sharded"], _full(saved_ws))
    assert torch.equal(whole["model"]["replicated"], torch.arange(6.0))
    assert whole["step"] == 3


def _events(root: str, rank: int) -> list[tuple[str, bool]]:
    with open(os.path.join(root, f"events-{rank}.jsonl")) as f:
        return [(e["event"], e["committed"]) for e in map(json.loads, f)]


def _check_one_checkpoint(root: str, world_size: int) -> str:
    path = os.path.join(root, "step-3")
    # Only the checkpoint's own files: no rank-<r> folders, no exchange messages left.
    names = os.listdir(path)
    assert "manifest.json" in names
    assert all(
        n == "manifest.json" or is_chunk_table(n) or (n.startswith("data-") and n.endswith(".bin"))
        for n in names
    ), names
    assert torchstow.latest(root) == path
    loaded = torchstow.read(path)
    assert torch.equal(loaded["model"]["sharded"], _full(world_size))
    assert torch.equal(loaded["model"]["replicated"], torch.arange(6.0))
    assert torch.equal(loaded["model"]["plain"], torch.arange(5.0))
    for rank in range(world_size):
        assert torch.equal(loaded[f"rank{rank}"], torch.full((2,), float(rank)))
    assert loaded["step"] == 3
    check_stored_once(path)  # replicated values and replicated shards are stored once
    # Every rank: pre_commit before the commit, post_commit after it.
    for rank in range(world_size):
        assert _events(root, rank) == [("pre_commit", False), ("post_commit", True)]
    return path


@pytest.mark.parametrize("mode", ["sync", "async", "process"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_write_is_one_checkpoint_at_path(pools: Any, tmp_path: Any, world_size: int, mode: str) -> None:
    root = str(tmp_path)
    pools(world_size).run(save_scenario, root, free_port(), mode, timeout=240)
    path = _check_one_checkpoint(root, world_size)
    if mode == "async":  # reshard into the other world size, DTensors sharded along the other dim
        other = 3 - world_size
        pools(other).run(load_scenario, path, world_size, timeout=120)


def test_a_failure_on_one_rank_fails_every_rank_and_commits_nothing(pools: Any, tmp_path: Any) -> None:
    root = str(tmp_path)
    leftovers = pools(2).run(failing_scenario, root, free_port(), timeout=120)
    assert leftovers == [[], []]  # no manifest, no data, no messages
    assert torchstow.latest(root) == os.path.join(root, "good")
    for rank in (0, 1):  # the failed write: no post_commit anywhere; the good one: both hooks
        assert _events(root, rank) == [("pre_commit", False), ("pre_commit", False), ("post_commit", True)]
