"""Read-once load planning on the coordinator: one reader per shared region, chosen to
balance nodes then ranks; dtypes kept apart; small regions packed, large ones alone, the
transfers in one order every rank agrees on, each reader's in the order it reads."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torchstow
from torchstow.core.planning import DefaultLoadPlanner, LoadPlan, read_once
from torchstow.core.planning.read_once import ReadOnceProbe, ReadOnceRole, plan_read_once, segment_bytes
from torchstow.core.protocol.fan_out import read_order
from torchstow.format import chunks as chunk_math
from torchstow.format.manifest import Metadata, StorageInfo

SIZE = 4096  # bytes of each of the equal tensors


def _checkpoint(tmp_path: Path, count: int = 4) -> tuple[Metadata, dict[str, torch.Tensor]]:
    state = {f"w{i}": torch.full((SIZE // 4,), float(i)) for i in range(count)}
    torchstow.save(state, tmp_path / "ckpt", no_dist=True)
    return torchstow.storage_reader(str(tmp_path / "ckpt")).read_metadata(), state


def _plan(metadata: Metadata, state: dict[str, torch.Tensor]) -> LoadPlan:
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, metadata)
    return planner.create_local_plan()


def _read_bytes(plan: LoadPlan, role: ReadOnceRole) -> int:
    items = plan.items if role.reads is None else [plan.items[i] for i in role.reads]
    return sum(item.lengths.numel() * 4 for item in items)


def _check_consistent(plans: list[LoadPlan], roles: list[ReadOnceRole]) -> None:
    """Every rank gets each item once: read, filled from a chunk it read whole, or received;
    every receive has its send, in a transfer both start at the same point of one order."""
    for rank, (plan, role) in enumerate(zip(plans, roles, strict=True)):
        reads = set(range(len(plan.items)) if role.reads is None else role.reads)
        received = {share.item for share in role.receives} | {i for i, _ in role.local}
        received |= {share.item for share in role.sends if share.part is not None}  # read in parts
        assert reads.isdisjoint(received) and reads | received == set(range(len(plan.items))), rank
    for a, role_a in enumerate(roles):
        for b, role_b in enumerate(roles):
            if a == b:
                continue
            # the transfers both take part in, in the same order on both
            shared_a = [t for t in role_a.transfers if {a, b} <= {t.source, *t.peers}]
            shared_b = [t for t in role_b.transfers if {a, b} <= {t.source, *t.peers}]
            assert shared_a == shared_b, (a, b)
            # what a sends b is what b receives from a, region by region
            sent = [s.nbytes for s in role_a.sends if b in s.peers]
            assert sent == [s.nbytes for s in role_b.receives if s.peers == (a,)], (a, b)
    for role in roles:
        for number, transfer in enumerate(role.transfers):
            parts = [s.nbytes for s in role.sends + role.receives if s.transfer == number]
            assert sum(segment_bytes(n) for n in parts[:-1]) + parts[-1] == transfer.nbytes


def test_replicated_regions_are_read_once_and_spread_over_ranks(tmp_path: Path) -> None:
    metadata, state = _checkpoint(tmp_path)
    plans = [_plan(metadata, state) for _ in range(4)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 4)
    _check_consistent(plans, roles)
    assert [_read_bytes(plan, role) for plan, role in zip(plans, roles, strict=True)] == [SIZE] * 4
    assert all(len(role.sends) == 1 and len(role.sends[0].peers) == 3 for role in roles)
    assert all(len(role.transfers) == 4 for role in roles)  # one broadcast from each rank


def test_readers_balance_nodes_before_ranks(tmp_path: Path) -> None:
    """Three ranks on one node, one on another: the lone rank's node reads half the bytes."""
    metadata, state = _checkpoint(tmp_path)
    plans = [_plan(metadata, state) for _ in range(4)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe(n) for n in ("a", "a", "a", "b")])
    _check_consistent(plans, roles)
    read = [_read_bytes(plan, role) for plan, role in zip(plans, roles, strict=True)]
    assert read[3] == 2 * SIZE and sum(read[:3]) == 2 * SIZE


def test_a_rank_loading_another_dtype_reads_its_own(tmp_path: Path) -> None:
    metadata, state = _checkpoint(tmp_path, count=2)
    plans = [_plan(metadata, state) for _ in range(3)]
    probes = [ReadOnceProbe("a"), ReadOnceProbe("a", {"w0": torch.float64}), ReadOnceProbe("a")]
    roles = plan_read_once(plans, metadata, probes)
    _check_consistent(plans, roles)
    assert roles[1].reads is not None
    assert [plans[1].items[i].dest_index.fqn for i in roles[1].reads] == ["w0"]  # w1 it receives
    for role in (roles[0], roles[2]):
        peers = {
            plans[0].items[share.item].dest_index.fqn: share.peers for share in role.sends + role.receives
        }
        assert 1 not in peers["w0"]


def test_small_regions_travel_packed_large_ones_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metadata, state = _checkpoint(tmp_path, count=6)
    plans = [_plan(metadata, state) for _ in range(2)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2)
    _check_consistent(plans, roles)
    # each rank reads 3 small regions the other needs: one transfer each way
    assert [len(role.transfers) for role in roles] == [2, 2]
    assert all(transfer.nbytes == 2 * segment_bytes(SIZE) + SIZE for transfer in roles[0].transfers)
    monkeypatch.setattr(read_once, "PACK_BYTES", 2 * SIZE)
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2)
    _check_consistent(plans, roles)
    assert [len(role.transfers) for role in roles] == [4, 4]  # 2 + 1 regions per reader
    monkeypatch.setattr(read_once, "DIRECT_BYTES", SIZE)
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2)
    _check_consistent(plans, roles)
    assert [len(role.transfers) for role in roles] == [6, 6]
    assert all(transfer.nbytes == SIZE for transfer in roles[0].transfers)


def test_readers_take_turns_in_the_order_of_what_they_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reader's transfers come in the order it reads, interleaved with the other
    readers' by how much each has read by then: every reader sends its first region
    before any sends its second."""
    monkeypatch.setattr(read_once, "DIRECT_BYTES", SIZE)
    metadata, state = _checkpoint(tmp_path, count=8)
    plans = [_plan(metadata, state) for _ in range(4)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 4)
    _check_consistent(plans, roles)
    (order,) = {tuple(t.source for t in role.transfers) for role in roles}
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:]) == [0, 1, 2, 3]


def test_nothing_shared_means_no_exchange(tmp_path: Path) -> None:
    metadata, state = _checkpoint(tmp_path)
    plans = [_plan(metadata, {"w0": state["w0"], "w1": state["w1"]}), _plan(metadata, {"w2": state["w2"]})]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2)
    assert roles == [ReadOnceRole(None, [], [], [])] * 2


def _column_halves(metadata: Metadata) -> list[LoadPlan]:
    """Two ranks' plans loading the left and right column halves of the chunk of ``m``."""
    plans = []
    for half in range(2):
        planner = DefaultLoadPlanner()
        planner.set_up_planner({"m": torch.zeros(8, 8)}, metadata)
        (item,) = planner.create_local_plan().items
        columns = torch.Size([0, 4 * half])
        plans.append(LoadPlan([replace(item, storage_offsets=columns, lengths=torch.Size([8, 4]))]))
    return plans


def _matrix(tmp_path: Path) -> Metadata:
    torchstow.save({"m": torch.arange(64.0).reshape(8, 8)}, tmp_path / "ckpt", no_dist=True)
    return torchstow.storage_reader(str(tmp_path / "ckpt")).read_metadata()


def test_overlapping_regions_of_one_chunk_are_read_whole_by_one_rank(tmp_path: Path) -> None:
    """Two ranks loading column halves of a row-major chunk would each read all of it."""
    metadata = _matrix(tmp_path)
    plans = _column_halves(metadata)
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2)
    _check_consistent(plans, roles)
    (reader,) = [rank for rank, role in enumerate(roles) if role.chunks]
    whole, dtype = roles[reader].chunks[0]
    assert whole.lengths == torch.Size([8, 8]) and dtype == torch.float32
    assert roles[reader].reads == [] and roles[reader].local == [(0, 0)]
    (send,) = roles[reader].sends
    assert send.chunk == (0, torch.Size([0, 4 * (1 - reader)]), torch.Size([8, 4])) and send.nbytes == 128
    assert roles[1 - reader].reads == [] and roles[1 - reader].receives[0].peers == (reader,)


def test_chunks_of_another_format_count_as_read_whole(tmp_path: Path) -> None:
    """Storage data that is not torchstow's (DCP's: an encoded item per chunk, read whole)
    plans as whole-chunk reads, not by block checksums it does not have."""
    metadata = _matrix(tmp_path)
    foreign = {
        index: SimpleNamespace(relative_path="x", offset=0, length=256) for index in metadata.storage_data
    }
    metadata = replace(metadata, storage_data=foreign)
    roles = plan_read_once(_column_halves(metadata), metadata, [ReadOnceProbe("a")] * 2)
    assert sum(len(role.chunks) for role in roles) == 1


MIB = 1 << 20  # the checksum block is 4 MiB


def _one_tensor(tmp_path: Path, shape: tuple[int, ...]) -> Metadata:
    """A checkpoint of one 16 MiB float32 tensor "emb"."""
    path = tmp_path / "x".join(map(str, shape))
    torchstow.save({"emb": torch.zeros(shape)}, path, no_dist=True)
    return torchstow.storage_reader(str(path)).read_metadata()


def _byte_ranges(metadata: Metadata, plans: list[LoadPlan], roles: list[ReadOnceRole]) -> list[list[range]]:
    """The stored byte ranges of "emb" each rank reads from storage."""
    (chunk,) = metadata.state_dict_metadata["emb"].chunks  # type: ignore[union-attr]
    out = []
    for plan, role in zip(plans, roles, strict=True):
        ranges = []
        for item in read_order(plan, role).items:
            span = chunk_math.contiguous_span(chunk.sizes, item.storage_offsets, item.lengths)
            assert span is not None
            ranges.append(range(span[0] * 4, (span[0] + span[1]) * 4))
        out.append(ranges)
    return out


def _read(metadata: Metadata, plans: list[LoadPlan], roles: list[ReadOnceRole]) -> list[int]:
    return [sum(len(r) for r in mine) for mine in _byte_ranges(metadata, plans, roles)]


@pytest.mark.parametrize("shape", [(1024, 4096), (4 * MIB,), (1, 2048, 2048)])
def test_one_large_replicated_tensor_is_read_in_parts_by_every_rank(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    """16 MiB, parts of at least 4 MiB: 4 ranks read a quarter each, on checksum block
    boundaries, every byte once; each rank sends its part to the 3 others and receives theirs."""
    metadata = _one_tensor(tmp_path, shape)
    plans = [_plan(metadata, {"emb": torch.zeros(shape)}) for _ in range(4)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 4, split_bytes=4 * MIB)
    _check_consistent(plans, roles)
    ranges = _byte_ranges(metadata, plans, roles)
    assert _read(metadata, plans, roles) == [4 * MIB] * 4
    starts = sorted(r.start for mine in ranges for r in mine)
    assert starts == [0, 4 * MIB, 8 * MIB, 12 * MIB]  # block boundaries, no byte twice
    for role in roles:
        assert role.reads == []
        assert [len(share.peers) for share in role.sends] == [3] and len(role.receives) == 3
    # parts of 2 MiB are rounded to whole blocks; two nodes of two ranks: each reads a quarter
    roles = plan_read_once(plans, metadata, [ReadOnceProbe(n) for n in "aabb"], split_bytes=2 * MIB)
    _check_consistent(plans, roles)
    assert _read(metadata, plans, roles) == [4 * MIB] * 4


def test_small_or_compressed_regions_are_not_split(tmp_path: Path) -> None:
    metadata = _one_tensor(tmp_path, (1024, 4096))
    plans = [_plan(metadata, {"emb": torch.zeros(1024, 4096)}) for _ in range(4)]
    whole = sorted([0, 0, 0, 16 * MIB])
    # under twice the part size: one reader
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 4, split_bytes=9 * MIB)
    _check_consistent(plans, roles)
    assert sorted(_read(metadata, plans, roles)) == whole
    # a chunk stored compressed is read whole
    (index,) = metadata.storage_data
    compressed = replace(metadata, storage_data={index: _compressed(metadata.storage_data[index])})
    roles = plan_read_once(plans, compressed, [ReadOnceProbe("a")] * 4, split_bytes=4 * MIB)
    _check_consistent(plans, roles)
    assert all(share.part is None for role in roles for share in role.sends)
    assert sorted(_read(metadata, plans, roles)) == whole
    # rows that never start on a block boundary: read whole
    metadata = _one_tensor(tmp_path, (2999, 1400))
    plans = [_plan(metadata, {"emb": torch.zeros(2999, 1400)}) for _ in range(4)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 4, split_bytes=4 * MIB)
    assert sorted(_read(metadata, plans, roles)) == [0, 0, 0, 2999 * 1400 * 4]


def _compressed(info: StorageInfo) -> StorageInfo:
    """``info`` as a chunk stored with a codec (with or without the manifest field for it)."""
    values = {f.name: getattr(info, f.name) for f in fields(info)}
    if "codec" in values:
        return replace(info, codec="zstd")
    compressed: StorageInfo = type("Compressed", (StorageInfo,), {"codec": "zstd"})(**values)
    return compressed
