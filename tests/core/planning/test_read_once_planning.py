"""Read-once load planning on the coordinator: one reader per shared region, chosen to
balance nodes then ranks; dtypes kept apart; rounds bounded in size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torchstow
from torchstow.core.planning import DefaultLoadPlanner, LoadPlan
from torchstow.core.planning.read_once import ReadOnceProbe, ReadOnceRole, plan_read_once, segment_bytes
from torchstow.format.manifest import Metadata

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
    every receive has its send."""
    for rank, (plan, role) in enumerate(zip(plans, roles, strict=True)):
        reads = set(range(len(plan.items)) if role.reads is None else role.reads)
        received = {share.item for share in role.receives} | {i for i, _ in role.local}
        assert reads.isdisjoint(received) and reads | received == set(range(len(plan.items))), rank
        for share in role.receives:
            (src,) = share.peers
            assert any(rank in send.peers and send.round == share.round for send in roles[src].sends)


def test_replicated_regions_are_read_once_and_spread_over_ranks(tmp_path: Path) -> None:
    metadata, state = _checkpoint(tmp_path)
    plans = [_plan(metadata, state) for _ in range(4)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 4)
    _check_consistent(plans, roles)
    assert [_read_bytes(plan, role) for plan, role in zip(plans, roles, strict=True)] == [SIZE] * 4
    assert all(len(role.sends) == 1 and len(role.sends[0].peers) == 3 for role in roles)
    assert {role.rounds for role in roles} == {1}


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


@pytest.mark.parametrize("round_bytes", [SIZE, 2 * SIZE, 3 * SIZE])
def test_rounds_stay_within_their_size(tmp_path: Path, round_bytes: int) -> None:
    metadata, state = _checkpoint(tmp_path, count=6)
    plans = [_plan(metadata, state) for _ in range(2)]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2, round_bytes=round_bytes)
    _check_consistent(plans, roles)
    rounds = roles[0].rounds
    assert rounds == -(-6 * SIZE // 2 // round_bytes)  # each rank sends 3 regions, receives 3
    for role in roles:
        for number in range(rounds):
            assert sum(segment_bytes(s.nbytes) for s in role.sends if s.round == number) <= round_bytes
            assert sum(segment_bytes(s.nbytes) for s in role.receives if s.round == number) <= round_bytes


def test_nothing_shared_means_no_exchange(tmp_path: Path) -> None:
    metadata, state = _checkpoint(tmp_path)
    plans = [_plan(metadata, {"w0": state["w0"], "w1": state["w1"]}), _plan(metadata, {"w2": state["w2"]})]
    roles = plan_read_once(plans, metadata, [ReadOnceProbe("a")] * 2)
    assert roles == [ReadOnceRole(None, [], [], 0)] * 2


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
