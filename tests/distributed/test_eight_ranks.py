"""Real 8-rank runs (gloo, small states): save, load, resharding 8 -> 3 -> 8, plan
caching and read-once loads, all in the session's one 8-rank worker group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dist_scenarios import load_model, save_model
from plan_cache_scenarios import save_series
from read_once_scenarios import counted_load, load_and_resave, save_state

pytestmark = pytest.mark.slow


def test_save_load_and_reshard_8_to_3_to_8(pools: Any, tmp_path: Path) -> None:
    by_8 = str(tmp_path / "by-8")
    expected = pools(8).run(save_model, by_8, ("R", "S0"), 5)[0]
    # the same layout back on 8 ranks, then 3 ranks load it sharded and save again
    for rank, result in enumerate(pools(8).run(load_model, by_8, ("R", "S0"), expected)):
        assert result["mismatches"] == [], (rank, result["mismatches"])
    by_3 = str(tmp_path / "by-3")
    for rank, wrong in enumerate(pools(3).run(load_and_resave, by_8, by_3, ("S0",), expected)):
        assert wrong == [], (rank, wrong)
    for layout in (("S0",), ("R", "S1")):
        for rank, result in enumerate(pools(8).run(load_model, by_3, layout, expected)):
            assert result["before"], rank
            assert result["mismatches"] == [], (layout, rank, result["mismatches"])
            assert result["lr"] == 0.01 and result["step"] == 2.0


def test_plan_caching_on_8_ranks(pools: Any, tmp_path: Path) -> None:
    saves_by_rank = pools(8).run(save_series, str(tmp_path), 7, 4)
    for rank, saves in enumerate(saves_by_rank):
        planned_in_full = [any(step == "save planning" for _, step, _ in save["calls"]) for save in saves]
        assert planned_in_full == [True, False, False, True, False], rank  # rank 7 changes at save 4
        assert all(save["loads_back"] for save in saves), rank


def test_read_once_on_8_ranks_reads_a_replicated_state_once(pools: Any, tmp_path: Path) -> None:
    uri = str(tmp_path / "replicated")
    stored = pools(8).run(save_state, uri, "plain", 3)[0]
    for layout in ("R", "R,S0"):
        results = pools(8).run(counted_load, uri, layout, 3, True)
        assert all(result["wrong"] == [] for result in results), layout
        reads = [result["read"] for result in results]
        assert sum(reads) <= 1.05 * stored, (layout, reads, stored)
        assert sum(read > 0 for read in reads) >= 6, (layout, reads)  # the work is shared
