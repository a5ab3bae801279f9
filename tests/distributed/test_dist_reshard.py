"""DTensor model + AdamW checkpoints saved by one world size and placement, loaded
bit-exact by others (real gloo processes), and read whole in a single process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_scenarios import load_model, mismatches, placements, save_model

import torchstow
from state_helpers import check_stored_once
from torchstow.format.structure import flatten_state_dict

Saved = tuple[str, dict[str, Any]]


def _save(pools: Any, root: Path, world_size: int, layout: tuple[str, ...], seed: int) -> Saved:
    path = str(root / f"ws{world_size}-{'-'.join(layout)}")
    expected = pools(world_size).run(save_model, path, layout, seed)[0]
    return path, expected


@pytest.fixture(scope="module")
def shard0_by_4(pools: Any, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """Saved by 4 ranks with every parameter (and its AdamW state) Shard(0)."""
    return _save(pools, tmp_path_factory.mktemp("reshard"), 4, ("S0",), seed=1)


def _check_loaded(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        assert result["before"], f"rank {rank}: the target already matched before loading"
        assert result["mismatches"] == [], f"rank {rank}: wrong after load: {result['mismatches']}"
        assert result["lr"] == 0.01  # param_groups came from the checkpoint...
        assert result["step"] == 2.0  # ...and so did the step counters


def _check_read(path: str, expected: dict[str, Any]) -> None:
    flat = flatten_state_dict(torchstow.read(path)).leaves
    assert mismatches(expected, flat) == []


@pytest.mark.parametrize(
    ("world_size", "layout"),
    [(2, ("S1",)), (2, ("R",)), (3, ("S0",)), (4, ("S0", "S1")), (4, ("R", "S0"))],
    ids=[
        "2-ranks-shard1",
        "2-ranks-replicate",
        "3-ranks-uneven",
        "2x2-mesh-shard0-shard1",
        "2x2-mesh-rep-shard0",
    ],
)
def test_shard0_by_4_ranks_loads_bit_exact(
    pools: Any, shard0_by_4: Saved, world_size: int, layout: tuple[str, ...]
) -> None:
    path, expected = shard0_by_4
    results = pools(world_size).run(load_model, path, layout, expected)
    _check_loaded(results)
    assert {r["weight_placements"] for r in results} == {str(tuple(placements(layout, 2)))}


def test_shard0_by_4_ranks_reads_whole_in_one_process(shard0_by_4: Saved) -> None:
    path, expected = shard0_by_4
    check_stored_once(path)
    full = torchstow.read(f"file://{path}")
    assert full["model"]["l1.weight"].shape == (10, 12)
    assert full["optim"]["param_groups"][0]["lr"] == 0.01
    _check_read(path, expected)


@pytest.mark.parametrize(
    ("saved_by", "loaded_by"),
    [
        ((4, ("S0", "S1")), (3, ("S1",))),  # 2-D mesh -> 1-D, uneven
        ((3, ("S1",)), (4, ("R", "S0"))),  # uneven shards -> 2-D mesh
        ((2, ("R",)), (4, ("S0",))),  # replicated (stored once) -> sharded
    ],
    ids=["2x2-to-3-shard1", "3-shard1-to-2x2", "2-replicate-to-4-shard0"],
)
def test_other_layouts_round_trip(
    pools: Any,
    tmp_path: Path,
    saved_by: tuple[int, tuple[str, ...]],
    loaded_by: tuple[int, tuple[str, ...]],
) -> None:
    path, expected = _save(pools, tmp_path, *saved_by, seed=2)
    check_stored_once(path)
    _check_loaded(pools(loaded_by[0]).run(load_model, path, loaded_by[1], expected))
    _check_read(path, expected)
    assert isinstance(expected["optim.state.0.exp_avg"], torch.Tensor)
