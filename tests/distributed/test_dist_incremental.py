"""Incremental saves over several ranks: each rank shares its unchanged shards with
the base (compressed ones too), and the result loads resharded after the base is deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from incremental_scenarios import SHAPES, expected, load_resharded, save_trusting, save_two_steps

import torchstow


@pytest.mark.parametrize("asynchronous", [False, True])
def test_two_ranks_share_unchanged_shards_and_the_result_reshards_after_the_base_goes(
    pools: Any, tmp_path: Path, asynchronous: bool
) -> None:
    root = str(tmp_path)
    written = pools(2).run(save_two_steps, root, asynchronous)[0]
    trainable = 16 * 32 * 4
    full = sum(r * c * 4 for r, c in SHAPES.values()) + 8 * 4
    assert written[0] >= full
    assert trainable <= written[1] < trainable + 2 * 4096  # the changed tensor's two shards
    torchstow.delete(f"{root}/step-1")
    got = torchstow.read(f"{root}/step-2")  # one process: both shards into whole tensors
    for name, tensor in expected(2).items():
        assert torch.equal(got[name], tensor), name
    assert pools(4).run(load_resharded, f"{root}/step-2", 2) == [True] * 4


def test_two_ranks_incremental_with_compression_share_compressed_shards_and_reshard(
    pools: Any, tmp_path: Path
) -> None:
    root = str(tmp_path)
    written = pools(2).run(save_two_steps, root, False, "zstd")[0]
    trainable = 16 * 32 * 4
    assert 0 < written[1] < trainable + 2 * 4096  # the changed tensor's two shards, compressed
    base = torchstow.storage_reader(f"{root}/step-1").read_metadata().storage_data
    step2 = torchstow.storage_reader(f"{root}/step-2").read_metadata().storage_data
    for index, info in step2.items():
        if index.fqn in SHAPES:  # every shard of each tensor compressed, unchanged ones shared
            # a float shard under 4 KiB (trainable's 1 KiB halves) is one zstd frame, larger ones byte planes
            assert info.codec == ("zstd" if index.fqn == "trainable" else "byteplanes-zstd"), (index, info)
            stored = (info.relative_path, info.offset, info.length, info.checksums)
            was = (base[index].relative_path, base[index].offset, base[index].length, base[index].checksums)
            assert (stored == was) == (index.fqn != "trainable"), (index, info, base[index])
    torchstow.delete(f"{root}/step-1")
    assert pools(2).run(load_resharded, f"{root}/step-2", 2) == [True] * 2  # Shard(0) saved, Shard(1) loaded


@pytest.mark.parametrize("asynchronous", [False, True])
def test_two_ranks_trusting_version_counters_hash_only_what_changed(
    pools: Any, tmp_path: Path, asynchronous: bool
) -> None:
    root = str(tmp_path)
    results = pools(2).run(save_trusting, root, asynchronous)
    shard = 16 * 32 * 4 // 2  # each rank's half of the changed tensor
    assert [hashed for hashed, _ in results] == [shard, shard]
    written = results[0][1]
    assert 2 * shard <= written < 2 * shard + 2 * 4096
    torchstow.delete(f"{root}/step-1")
    torchstow.delete(f"{root}/step-2")
    got = torchstow.read(f"{root}/step-3")
    for name, tensor in expected(1).items():
        assert torch.equal(got[name], tensor + 1 if name == "trainable" else tensor), name
