"""Repeated saves of one structure reuse the global plan: one small exchange of
fixed-size records, no plans gathered or scattered; any change on any rank
plans in full on every rank, and every checkpoint loads back bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from plan_cache_scenarios import failing_after_cached, save_series

RECORD = 33  # bytes per rank: a flag, the cache generation, the structure digest


def _planning(calls: list[tuple[str, str, int]]) -> list[tuple[str, int]]:
    """The collectives of the save-planning step (plans in, plans out)."""
    return [(name, nbytes) for name, step, nbytes in calls if step == "save planning"]


def _cache_check(calls: list[tuple[str, str, int]]) -> list[tuple[str, int]]:
    return [(name, nbytes) for name, step, nbytes in calls if step == "save plan cache"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_unchanged_structure_reuses_the_plan_and_a_change_on_one_rank_replans_everywhere(
    pools: Any, tmp_path: Path, world_size: int
) -> None:
    last = world_size - 1
    saves_by_rank = pools(world_size).run(save_series, str(tmp_path), last, 4)
    for rank, saves in enumerate(saves_by_rank):
        planned_in_full = [bool(_planning(save["calls"])) for save in saves]
        # save 1 plans; 2 and 3 hit; 4 (rank `last` changed) plans on every rank; 5 hits again
        assert planned_in_full == [True, False, False, True, False], rank
        for save in saves:
            assert _cache_check(save["calls"]) == [("all_gather_records", RECORD)]
        for number, save in enumerate(saves, start=1):
            assert save["loads_back"], (rank, number)
            assert save["manifest_step"] == number  # JSON leaves are data, fresh on a hit
            assert save["manifest_note"] == f"saved at step {number}"
        # a leaf that differs between ranks comes, on a hit, from the rank full planning chose
        who = [save["manifest_who"].split(" at step ") for save in saves]
        assert [step for _, step in who] == ["1", "2", "3", "4", "5"]
        assert who[0][0] == who[1][0] == who[2][0] and who[3][0] == who[4][0], who
        # the reused manifest describes what a full planning described
        assert saves[1]["entries"] == saves[0]["entries"]
        assert saves[4]["entries"] == saves[3]["entries"]
        assert saves[3]["entries"] != saves[0]["entries"]
    first_planning = _planning(saves_by_rank[1][0]["calls"])
    assert first_planning[0][0] == "gather" and first_planning[0][1] > 0  # a rank's plan went out


def test_hits_send_no_plan_bytes_only_results(pools: Any, tmp_path: Path) -> None:
    saves_by_rank = pools(2).run(save_series, str(tmp_path), -1, 99)
    for saves in saves_by_rank:
        for save in saves[1:]:
            steps = [(name, step) for name, step, _ in save["calls"]]
            assert steps == [
                ("all_gather_records", "save plan cache"),  # records
                ("gather", "save write"),  # results in
                ("broadcast", "save write"),  # commit out
                ("all_gather_records", "save write"),  # every rank unpickled it
            ]
            assert sum(nbytes for _, step, nbytes in save["calls"] if step != "save write") == RECORD


def test_the_switch_turns_caching_off(pools: Any, tmp_path: Path) -> None:
    saves_by_rank = pools(2).run(save_series, str(tmp_path), -1, 99, False)
    for saves in saves_by_rank:
        assert all(_planning(save["calls"]) for save in saves)
        # the records still travel (every rank runs the same collectives whatever its planner)
        assert all(_cache_check(save["calls"]) == [("all_gather_records", RECORD)] for save in saves)
        assert all(save["loads_back"] for save in saves)


def test_a_failure_on_one_rank_after_cached_saves_fails_everywhere_and_the_next_save_works(
    pools: Any, tmp_path: Path
) -> None:
    outcomes = pools(2).run(failing_after_cached, str(tmp_path))
    assert outcomes == [["ok", "ok", "failed on [1]", "ok"]] * 2
