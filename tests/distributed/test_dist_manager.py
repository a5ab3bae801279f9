"""``CheckpointManager`` on real gloo ranks: every rank saves, the coordinator prunes,
and the checkpoints it keeps restore bit-exact on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from manager_scenarios import (
    incremental_save_where_rank_1_cannot_list,
    restore_latest,
    restore_latest_listed_apart,
    save_in_subgroups,
    save_steps,
    save_steps_and_prune,
)

import torchstow
from dist_pool import WorkerPool


@pytest.mark.parametrize("asynchronous", [False, True])
def test_two_ranks_save_prune_on_the_coordinator_and_restore(
    pools: Any, tmp_path: Path, asynchronous: bool
) -> None:
    root = str(tmp_path / "run")
    seen = pools(2).run(save_steps_and_prune, root, 4, asynchronous)
    assert seen[0] == seen[1] == ["step-1", "step-1,step-2", "step-2,step-3", "step-3,step-4"]
    assert pools(2).run(restore_latest, root) == [(4, True)] * 2


@pytest.mark.parametrize(("asynchronous", "incremental"), [(False, False), (True, False), (True, True)])
def test_pruning_while_other_ranks_start_the_next_save_loses_nothing(
    pools: Any, tmp_path: Path, asynchronous: bool, incremental: bool
) -> None:
    root = tmp_path / "run"
    pools(2).run(save_steps, str(root), 5, asynchronous, incremental)
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-5"]
    assert pools(2).run(restore_latest, str(root)) == [(5, True)] * 2
    if incremental:  # step 5 shares the frozen tensor with step 4, and stands alone once 4 goes
        assert torchstow.info(str(root / "step-5")).nbytes_written < 4096 * 4
        torchstow.delete(str(root / "step-4"))
        assert torch.equal(torchstow.read(str(root / "step-5"))["frozen"], torch.arange(4096.0))


def test_managers_of_subgroups_prune_on_their_own_coordinators(pools: Any, tmp_path: Path) -> None:
    results = pools(4).run(save_in_subgroups, str(tmp_path), 4)
    # the odd group holds no global rank 0, and the even group's coordinator is its rank 1 (global 2)
    assert [pruned for _, pruned, _ in results] == [0, 4, 4, 0]
    assert all(listing == ["step-3", "step-4"] and restored for listing, _, restored in results)


@pytest.mark.parametrize("how", ["lags", "fails"])
def test_every_rank_restores_the_step_the_coordinator_finds(tmp_path: Path, how: str) -> None:
    """restore() without a step: the coordinator lists the root and every rank loads what it
    found, whatever the other ranks' listings say (before: rank 1 loaded another step, or
    raised alone while rank 0 waited in the load until the timeout). A fresh group."""
    root = str(tmp_path / "run")
    pool = WorkerPool(2)
    try:
        pool.run(save_steps, root, 2, False)
        assert pool.run(restore_latest_listed_apart, root, how) == [(2, True)] * 2
    finally:
        pool.close()


def test_an_incremental_save_goes_on_when_one_rank_cannot_list_the_root(tmp_path: Path) -> None:
    """The base is looked for on each rank; a rank whose listing fails saves in full instead
    of raising alone (before: rank 1 raised OSError and rank 0 waited in the save until the
    timeout). A fresh group."""
    pool = WorkerPool(2)
    try:
        assert pool.run(incremental_save_where_rank_1_cannot_list, str(tmp_path / "run")) == [(2, True)] * 2
    finally:
        pool.close()
