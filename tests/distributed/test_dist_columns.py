"""Ranks hand the coordinator their write results as columns: the manifest a real
2-rank save commits is the one the per-item path (a writer returning one WriteResult
per item) commits, entry for entry, with and without compression and for incremental
saves; what each save returns is what a load reads; both load back."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from columns_scenarios import save_both_ways, state

import torchstow
from torchstow.testing import state_differences

_SAVE_ID = re.compile(r"data-[0-9a-f]+-(\d+-\d+\.bin)")


def _named_by_place(locations: dict[Any, Any]) -> dict[Any, Any]:
    """Locations with each data file named by its rank and number alone (file names
    carry their save's id, which differs between two saves)."""
    return {
        index: dataclasses.replace(info, relative_path=_SAVE_ID.sub(r"data-\1", info.relative_path))
        for index, info in locations.items()
    }


def _read(path: Path) -> tuple[dict[str, Any], dict[Any, Any]]:
    metadata = torchstow.storage_reader(str(path)).read_metadata()
    return dict(metadata.state_dict_metadata), dict(metadata.storage_data.items())


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_save_from_columns_commits_the_manifest_the_per_item_path_commits(
    pools: Any, tmp_path: Path, compression: str | None
) -> None:
    returned = pools(2).run(save_both_ways, str(tmp_path), compression)
    for name in ("", "2"):
        entries, locations = _read(tmp_path / f"columns{name}")
        other_entries, other_locations = _read(tmp_path / f"objects{name}")
        assert entries == other_entries
        assert len(locations) == len(other_locations) > 0
        assert _named_by_place(locations) == _named_by_place(other_locations)
        for rank in range(2):  # what every rank's save returned is what a load reads
            for kind in ("columns", "objects"):
                got_entries, got_locations = returned[rank][kind + name]
                assert got_entries == (entries if kind == "columns" else other_entries)
                assert got_locations == (locations if kind == "columns" else other_locations)
    for kind in ("columns", "objects"):  # the incremental saves shared their base's unchanged items
        base_files = {info.relative_path for info in _read(tmp_path / kind)[1].values()}
        assert base_files & {info.relative_path for info in _read(tmp_path / f"{kind}2")[1].values()}
    expected = state(0, 2, distributed=False)  # the sharded tensor whole
    expected["half"] = expected["half"] + 1
    for kind in ("columns", "objects"):
        assert not state_differences(expected, torchstow.read(str(tmp_path / f"{kind}2")))
