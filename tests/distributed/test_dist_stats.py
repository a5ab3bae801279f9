"""Each rank's SaveStats of a distributed save: its own phases and bytes; the
coordinator alone coordinates and commits, and the manifest's duration is its."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stats_scenarios import stats_of_saves


def test_each_rank_counts_its_own_phases_and_bytes(pools: Any, tmp_path: Path) -> None:
    by_rank = pools(2).run(stats_of_saves, str(tmp_path))
    (full0, hit0, async0), (full1, hit1, async1) = by_rank
    assert list(full0["seconds"]) == ["plan", "coordinate", "write", "commit"]
    assert list(full1["seconds"]) == ["plan", "write"]  # the coordinator plans globally and commits
    assert list(hit0["seconds"]) == ["plan", "write", "commit"]  # the cached global plan: no coordination
    assert list(hit1["seconds"]) == ["plan", "write"]
    assert list(async0["seconds"]) == ["stage", "plan", "coordinate", "write", "commit"]
    assert list(async1["seconds"]) == ["stage", "plan", "write"]
    for rank, saves in enumerate(by_rank):
        mine = (rank + 1) * 100 * 4
        assert [(s["bytes_written"], s["bytes_staged"]) for s in saves] == [
            (mine, 0),
            (mine, 0),
            (mine, mine),
        ]
        assert all(seconds >= 0 for s in saves for seconds in s["seconds"].values())
    # Every rank holds the manifest the coordinator committed, with its duration.
    for coordinator, other in ((full0, full1), (hit0, hit1), (async0, async1)):
        before_commit = sum(s for p, s in coordinator["seconds"].items() if p != "commit")
        assert coordinator["save_seconds"] == other["save_seconds"] >= before_commit
