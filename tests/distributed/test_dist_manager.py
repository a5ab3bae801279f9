"""``CheckpointManager`` on real gloo ranks: every rank saves, the coordinator prunes,
and the checkpoints it keeps restore bit-exact on every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from manager_scenarios import (
    incremental_save_listed_apart,
    restore_latest,
    restore_latest_listed_apart,
    save_below_the_newest_step,
    save_in_subgroups,
    save_steps,
    save_steps_and_prune,
    save_while_pruning_fails,
)

import torchstow


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


def test_a_pruning_failure_on_the_coordinator_is_a_warning_and_every_rank_saves_on(
    pools: Any, tmp_path: Path
) -> None:
    """The coordinator's pruning fails after every save (asynchronous ones and a synchronous
    one): each save committed, so the coordinator logs a warning and every rank goes on
    saving (before: the coordinator raised the failure alone, from the next save after an
    asynchronous one, from the save itself after a synchronous one, while the other rank went
    into its next save and waited there until the timeout)."""
    results = pools(2).run(save_while_pruning_fails, str(tmp_path / "run"))
    assert results == [([1, 2, 3], 3), ([1, 2, 3], 0)]


def test_managers_of_subgroups_prune_on_their_own_coordinators(pools: Any, tmp_path: Path) -> None:
    results = pools(4).run(save_in_subgroups, str(tmp_path), 4)
    # the odd group holds no global rank 0, and the even group's coordinator is its rank 1 (global 2)
    assert [pruned for _, pruned, _ in results] == [0, 4, 4, 0]
    assert all(listing == ["step-3", "step-4"] and restored for listing, _, restored in results)


@pytest.mark.parametrize("how", ["lags", "fails"])
def test_every_rank_restores_and_lists_the_steps_the_coordinator_finds(
    pools: Any, tmp_path: Path, how: str
) -> None:
    """restore() without a step: the coordinator lists the root and every rank loads what it
    found, whatever the other ranks' listings say (before: rank 1 loaded another step, or
    raised alone while rank 0 waited in the load until the timeout). So do steps() and
    latest_step() of a manager given the process group (before: rank 1 listed on its own)."""
    root = str(tmp_path / "run")
    pools(2).run(save_steps, root, 2, False)
    assert pools(2).run(restore_latest_listed_apart, root, how) == [(2, True, [1, 2], 2)] * 2


@pytest.mark.parametrize(("apart", "how"), [(1, "lags"), (1, "fails"), (0, "fails")])
def test_every_rank_saves_incrementally_against_the_base_the_coordinator_chose(
    pools: Any, tmp_path: Path, apart: int, how: str
) -> None:
    """A restarted incremental manager saves step 3 (step 2's weight) while one rank's listing
    of the root lags or fails. The coordinator chooses the base for every rank: step 2 while
    its listing works, so nothing is written again; a full save on every rank when it fails
    (before: each rank looked on its own, and rank 1 saved against step 1, or in full, while
    rank 0 used step 2, or a full save while rank 1 used step 2)."""
    root = tmp_path / "run"
    results = pools(2).run(incremental_save_listed_apart, str(root), apart, how)
    base = None if apart == 0 else str(root / "step-2")
    assert results == [(base, 3, True)] * 2
    written = torchstow.info(str(root / "step-3")).nbytes_written
    shard = 8 * 16 * 4  # each rank's part of the weight
    assert written < shard if base else written >= 2 * shard


def test_every_rank_refuses_a_save_below_the_newest_step_and_nothing_is_written(
    pools: Any, tmp_path: Path
) -> None:
    """After restoring step 1 of steps 1 and 3, saving step 2 is refused on every rank with the
    same error, though rank 1's own listing does not show step 3: the coordinator decides
    (before: step 2 was saved, then pruned for step 3 with keep_last=1)."""
    root = tmp_path / "run"
    results = pools(2).run(save_below_the_newest_step, str(root))
    assert results[0] == results[1]
    raised, message, listing = results[0]
    assert raised and "older than the committed step(s) 3" in message
    assert listing == ["step-1", "step-3"]
