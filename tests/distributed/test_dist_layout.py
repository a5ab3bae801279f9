"""What a distributed save writes and a load reads: replicated data once and
spread over the ranks, a constant number of collectives, subgroups with their
own coordinator, and partial reads of only the overlapping byte ranges."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from dist_scenarios import (
    big_load_counting,
    big_save,
    count_collectives,
    replicated_save,
    subgroup_round_trip,
)

from manifest_json import manifest_doc
from torchstow.format.files import BLOCK_SIZE

_DATA_FILE = re.compile(r"data-[0-9a-f]+-(\d+)-\d+\.bin")


def test_replicated_tensors_and_objects_are_written_once_spread_over_ranks(
    pools: Any, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt"
    pools(4).run(replicated_save, str(path))
    manifest = manifest_doc(path)
    writer_of = [int(_DATA_FILE.fullmatch(name).group(1)) for name in manifest["files"]]  # type: ignore[union-attr]
    tensors: dict[int, int] = {}
    objects: dict[int, int] = {}
    for fqn, entry in manifest["entries"].items():
        if fqn.startswith("layers."):
            assert "chunks" not in entry  # one whole chunk, not one per rank
            rank = writer_of[entry["file"]]
            tensors[rank] = tensors.get(rank, 0) + 1
        elif fqn.startswith("objects."):
            assert entry["encoding"] == "torch"
            rank = writer_of[entry["file"]]
            objects[rank] = objects.get(rank, 0) + 1
    assert manifest["entries"]["epoch"] == {"encoding": "json", "value": 5}
    assert tensors == {0: 2, 1: 2, 2: 2, 3: 2}  # 8 replicated tensors of equal size: 2 per rank
    assert objects == {0: 2, 1: 2, 2: 2, 3: 2}
    data_bytes = sum(os.path.getsize(path / name) for name in manifest["files"])
    one_copy = 8 * 64 * 256 * 4
    assert one_copy <= data_bytes < one_copy + 16 * 4096  # one copy, plus objects and alignment


def test_collectives_do_not_grow_with_the_number_of_items_and_need_no_numpy(
    pools: Any, tmp_path: Path
) -> None:
    few = pools(2).run(count_collectives, str(tmp_path / "few"), 3)
    many = pools(2).run(count_collectives, str(tmp_path / "many"), 300)
    assert few == many
    assert few[0] == {
        "save": {"gather": 2, "scatter": 1, "broadcast": 1},  # plans in, plans out, results in, commit out
        "load": {"broadcast": 2, "gather": 2, "scatter": 1},  # manifest out, plans in/out, done in/out
    }


def test_subgroups_save_and_load_with_their_own_coordinator(pools: Any, tmp_path: Path) -> None:
    results = pools(4).run(subgroup_round_trip, str(tmp_path), None)
    for rank, result in enumerate(results):
        assert result["group"] == f"group{rank % 2}"
        assert result["saved"]
        assert sorted(result["loaded"]) == [f"part{rank // 2}", "shared"]  # its group rank's part
    assert (tmp_path / "group0" / "manifest.json").exists()
    assert (tmp_path / "group1" / "manifest.json").exists()


def test_failure_in_a_subgroup_names_group_ranks_and_spares_the_other_group(
    pools: Any, tmp_path: Path
) -> None:
    results = pools(4).run(subgroup_round_trip, str(tmp_path), 3)  # global rank 3 = rank 1 of the odd group
    for rank in (0, 2):
        assert results[rank]["saved"]
    for rank in (1, 3):
        assert not results[rank]["saved"]
        assert set(results[rank]["failures"]) == {1}
        assert results[rank]["failures"][1]["builtin"] == "OSError"
    assert (tmp_path / "group0" / "manifest.json").exists()
    assert not (tmp_path / "group1" / "manifest.json").exists()


@pytest.mark.slow
def test_each_rank_reads_only_the_byte_ranges_of_its_shard(pools: Any, tmp_path: Path) -> None:
    rows, cols = 3072, 4096  # 48 MiB saved as 4 shards of 12 MiB (3 checksum blocks each)
    path = str(tmp_path / "big")
    pools(4).run(big_save, path, rows, cols)
    total = rows * cols * 4
    for result in pools(3).run(big_load_counting, path, rows, cols):
        assert result["correct"]
        assert result["needed_bytes"] == total // 3
        # Reads cover the shard, widened to whole checksum blocks of the <= 2 stored chunks it spans.
        assert result["needed_bytes"] <= result["read_bytes"] <= result["needed_bytes"] + 2 * 2 * BLOCK_SIZE
        assert result["read_bytes"] < total // 2
