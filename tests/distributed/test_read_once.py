"""Read-once loads (real gloo processes): stored bytes several ranks need are read from
storage once, by ranks sharing the work, and sent to the others; values stay bit-exact;
``read_once=False`` reads them on every rank; a failing reader fails every rank alike."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from read_once_scenarios import (
    LARGE,
    big_state,
    counted_load,
    failing_fan_out,
    failing_load,
    failing_send,
    large_state,
    pipelined_load,
    save_state,
    split_load,
)

import torchstow
from torchstow.format.manifest import MetadataIndex

pytestmark = pytest.mark.slow


def _loads(pool: Any, uri: str, layout: str, read_once: bool) -> list[int]:
    results = pool.run(counted_load, uri, layout, 7, read_once)
    for rank, result in enumerate(results):
        assert result["wrong"] == [], f"rank {rank} loaded wrong values: {result['wrong']}"
    return [result["read"] for result in results]


def _one_failure_everywhere(results: list[dict[str, Any]], rank: int, text: str) -> dict[str, Any]:
    """Every rank raised the same CheckpointException, naming ``rank``'s failure (with
    ``text`` in it) and no other; that failure as the ranks report it."""
    for where, result in enumerate(results):
        assert result.get("class") == "CheckpointException", (where, result)
        assert list(result["failures"]) == [rank], (where, result)
    assert len({result["message"] for result in results}) == 1
    failure: dict[str, Any] = results[0]["failures"][rank]
    assert text in failure["message"]
    return failure


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_each_stored_byte_is_read_once_and_the_work_is_shared(
    pools: Any, tmp_path: Path, world_size: int
) -> None:
    pool = pools(world_size)
    replicated = str(tmp_path / "replicated")
    stored = pool.run(save_state, replicated, "plain", 7)[0]
    reads = _loads(pool, replicated, "plain", True)
    assert sum(reads) <= 1.05 * stored, (reads, stored)
    assert max(reads) <= 2 * stored / world_size, f"one rank read most of it: {reads}"
    assert all(read >= stored for read in _loads(pool, replicated, "plain", False))
    # column shards of row-major chunks overlap in what they read: one rank reads each chunk
    reads = _loads(pool, replicated, "S1", True)
    assert sum(reads) <= 1.05 * stored, (reads, stored)
    assert sum(_loads(pool, replicated, "S1", False)) >= (world_size - 0.5) * stored

    sharded = str(tmp_path / "sharded")
    stored = pool.run(save_state, sharded, "S0", 7)[0]
    assert sum(_loads(pool, sharded, "S0", True)) <= 1.05 * stored  # nothing to share, nothing lost
    # resharded into replicas of shards (2 x world/2 mesh): each replica pair shares its reads
    reads = _loads(pool, sharded, "R,S0", True)
    assert sum(reads) <= 1.05 * stored, (reads, stored)
    assert sum(_loads(pool, sharded, "R,S0", False)) >= 2 * stored
    # plain tensors on every rank from a sharded save: every rank needs every byte
    reads = _loads(pool, sharded, "plain", True)
    assert sum(reads) <= 1.05 * stored, (reads, stored)


def test_a_rank_failing_to_read_fails_every_rank_alike(pools: Any, tmp_path: Path) -> None:
    pool = pools(4)
    path = tmp_path / "ckpt"
    pool.run(save_state, str(path), "plain", 7)
    results = pool.run(failing_load, f"faulty+file://{path}?fail=read_data&ranks=1", "plain")
    _one_failure_everywhere(results, 1, "injected fault in read_data")


def test_a_rank_failing_in_the_fan_out_fails_every_rank_alike(pools: Any, tmp_path: Path) -> None:
    pool = pools(4)
    path = str(tmp_path / "ckpt")
    pool.run(save_state, path, "plain", 7)
    results = pool.run(failing_fan_out, path, 2)
    failure = _one_failure_everywhere(results, 2, "injected failure placing")
    assert "place_received" in failure["frames"]  # it failed placing received bytes


def test_a_rank_failing_to_send_fails_every_rank_alike(pools: Any, tmp_path: Path) -> None:
    pool = pools(4)
    path = str(tmp_path / "ckpt")
    pool.run(save_state, path, "plain", 7)
    results = pool.run(failing_send, path, 1)
    _one_failure_everywhere(results, 1, "injected failure building a send")


def test_the_reader_verifies_checksums_before_sending(pools: Any, tmp_path: Path) -> None:
    """A corrupted region fails the one rank that read it, and every rank raises; with
    read_once=False every rank reads the bad bytes itself."""
    pool = pools(4)
    path = tmp_path / "ckpt"
    pool.run(save_state, str(path), "plain", 7)
    metadata = torchstow.storage_reader(str(path)).read_metadata()
    info = metadata.storage_data[MetadataIndex("w3", (0, 0))]
    data = path / info.relative_path
    raw = bytearray(data.read_bytes())
    raw[info.offset + 100] ^= 0xFF
    data.write_bytes(bytes(raw))
    results = pool.run(failing_load, str(path), "plain")
    failed = {rank for result in results for rank in result["failures"]}
    assert len(failed) == 1, results
    for result in results:
        assert [f["type"] for f in result["failures"].values()] == ["ChecksumMismatchError"]
        assert "'w3'" in next(iter(result["failures"].values()))["message"]


def test_readers_send_what_they_have_read_while_they_read_on(pools: Any, tmp_path: Path) -> None:
    """Each rank may read one tensor, then reads on only once the other rank has received
    one from it: a load that read everything before sending anything would stall."""
    uri = str(tmp_path / "ckpt")
    torchstow.save(big_state(3), uri, no_dist=True)
    gates = tmp_path / "gates"
    gates.mkdir()
    assert pools(2).run(pipelined_load, uri, str(gates), 3) == [[], []]


@pytest.mark.parametrize("world_size", [2, 4])
def test_one_large_tensor_is_read_in_parts_by_every_rank(pools: Any, tmp_path: Path, world_size: int) -> None:
    """One replicated 16 MiB tensor, parts of 4 MiB: each rank reads its share of the parts,
    every byte once, and every rank ends with it bit-exact (also into a strided target). A
    corrupted block fails the one rank that read its part, and every rank raises the same
    CheckpointException."""
    path = tmp_path / "ckpt"
    torchstow.save(large_state(5), str(path), no_dist=True)
    stored = math.prod(LARGE) * 4
    results = pools(world_size).run(split_load, str(path), 5, 4 << 20)
    assert all(result.get("exact") for result in results), results
    reads = [result["read"] for result in results]
    assert sum(reads) == stored and all(read == stored // world_size for read in reads), reads
    # a rank loading into memory that is not contiguous gets its parts through copies
    results = pools(world_size).run(split_load, str(path), 5, 4 << 20, 1)
    assert all(result.get("exact") for result in results), results
    assert [result["read"] for result in results] == reads

    metadata = torchstow.storage_reader(str(path)).read_metadata()
    info = metadata.storage_data[MetadataIndex("emb", (0, 0))]
    data = path / info.relative_path
    raw = bytearray(data.read_bytes())
    raw[info.offset + 9 * (1 << 20)] ^= 0xFF  # in the third block
    data.write_bytes(bytes(raw))
    results = pools(world_size).run(split_load, str(path), 5, 4 << 20)
    failed = {rank for result in results for rank in result.get("failures", ())}
    assert len(failed) == 1, results
    for result in results:
        assert result.get("class") == "CheckpointException[ChecksumMismatchError]", result
        assert [f["type"] for f in result["failures"].values()] == ["ChecksumMismatchError"]
    assert len({result["message"] for result in results}) == 1
