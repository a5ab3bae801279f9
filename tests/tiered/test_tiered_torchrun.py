"""Tiered checkpoints with real torchrun agents: two nodes (c10d rendezvous on
127.0.0.1, ``{node}`` in the fast tier's URI), gloo, small states."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiered_agents import logs_of, run_job, start_job

from torchstow import verify

pytestmark = pytest.mark.slow

LEVELS = ["staged", "fast", "replicated", "durable"]


def _ok(tmp: Path, name: str, codes: list[int], records: dict[int, dict], world: int) -> dict[int, dict]:
    assert codes == [0] * len(codes) and len(records) == world, logs_of(tmp, name)
    return records


def _data_file(step_dir: Path, rank: int) -> Path:
    (found,) = [p for p in step_dir.glob("data-*.bin") if p.name.split("-")[2] == str(rank)]
    return found


def _flip_byte(step_dir: Path, rank: int) -> None:
    """Flip one checked byte of ``rank``'s data file in the copy ``step_dir``."""
    damaged = _data_file(step_dir, rank)
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert not verify(str(step_dir)).ok  # the flip hit checked bytes


def test_levels_replica_restore_without_root_and_reshard(tmp_path: Path) -> None:
    root = tmp_path / "root"
    fast = f"{tmp_path}/fast/{{node}}"

    # 2 nodes x 2 ranks save steps 1..3; every step persisted.
    records = _ok(tmp_path, "save", *run_job(tmp_path, "save", "save", root, fast, 1, 2, 3), world=4)
    for record in records.values():
        for step, seen in record["saved"].items():
            assert seen["levels"] == LEVELS, (step, seen)  # reported in order, each one reached
            assert seen["stats"] == LEVELS
        assert record["steps"][-2:] == [[2, ["fast", "durable"]], [3, ["fast", "durable"]]]
    # fast_keep=2
    assert sorted(p.name for p in (tmp_path / "fast" / "0").glob("step-*")) == ["step-2", "step-3"]
    # With 2 nodes and replicas=1 each node's copy is a complete, ordinary checkpoint.
    assert all(verify(str(tmp_path / "fast" / node / "step-3")).ok for node in ("0", "1"))
    node_of = {r: rec["node"] for r, rec in records.items()}
    other = node_of[2]  # the node of ranks 2 and 3
    assert node_of[3] == other != node_of[0] == node_of[1]

    # Node `other` loses its fast tier (the root holds every step, complete); 2 ranks (one per
    # node) restore the 4 ranks' step: 4 -> 2, reading nothing from the root (every byte read
    # from it is counted); then they save step 4 (not persisted).
    shutil.rmtree(tmp_path / "fast" / str(other))
    codes, records = run_job(
        tmp_path, "shrink", "restore-then-save", root, fast, 4, nproc=1, env={"TIERED_PERSIST_EVERY": "100"}
    )
    records = _ok(tmp_path, "shrink", codes, records, world=2)
    assert {(r["restored"], r["exact"], r["root_read"]) for r in records.values()} == {(3, True, 0)}
    assert {tuple(r["saved"]["4"]["levels"]) for r in records.values()} == {tuple(LEVELS[:3])}

    # A flipped byte in node `other`'s copy of group rank 1's part of step 4 (only the fast
    # tiers hold step 4): that node's ranks read the other node's replica. 2 -> 4: four ranks
    # restore the step two saved, bit-exact, nothing from the root.
    _flip_byte(tmp_path / "fast" / str(other) / "step-4", 1)
    records = _ok(tmp_path, "grow", *run_job(tmp_path, "grow", "restore", root, fast), world=4)
    assert {(r["restored"], r["exact"], r["root_read"]) for r in records.values()} == {(4, True, 0)}
    assert verify(str(root / "step-3")).ok  # the root was there all along


def test_kill_leaves_the_newest_complete_step(tmp_path: Path) -> None:
    """SIGKILL of a rank during the fast save, the replication and the persist (three jobs side
    by side); one job then restores each of them."""
    cases = [  # (mode, last step, persist_every, the step a restore then finds)
        ("kill-fast", 3, 1, 2),  # step 3 committed nowhere: step 2 is the newest complete one
        ("kill-replication", 3, 1, 3),  # step 3 committed on both nodes; the half replica is not used
        ("kill-persist", 4, 2, 4),  # step 4 complete in the fast tiers, not durable
    ]
    jobs = []
    for mode, last, persist_every, _ in cases:
        env = {
            "TIERED_KILL_RANK": "1",
            "TIERED_KILL_STEP": str(last),
            "TIERED_PERSIST_EVERY": str(persist_every),
        }
        where = tmp_path / mode
        where.mkdir()
        jobs.append(
            start_job(
                where,
                "killed",
                mode,
                where / "root",
                f"{where}/fast/{{node}}",
                *range(1, last + 1),
                nproc=1,
                env=env,
            )
        )
    for (mode, *_), job in zip(cases, jobs, strict=True):
        codes, records = job.wait()
        log = logs_of(tmp_path / mode, "killed")
        assert any(codes) and 1 not in records, log  # rank 1 died by SIGKILL
        assert "Signals.SIGKILL" in log or "-9" in log
    roots = ",".join(str(tmp_path / mode / "root") for mode, *_ in cases)
    fasts = ",".join(f"{tmp_path / mode}/fast/{{node}}" for mode, *_ in cases)
    codes, records = run_job(tmp_path, "restore", "restore", roots, fasts, nproc=1)
    records = _ok(tmp_path, "restore", codes, records, world=2)
    for k, (mode, last, persist_every, expected) in enumerate(cases):
        runs = [r["runs"][k] for r in records.values()]
        assert {(r["restored"], r["exact"]) for r in runs} == {(expected, True)}, mode
        steps = dict(map(tuple, runs[0]["steps"]))  # type: ignore[arg-type]
        durable = sorted(s for s, tiers in steps.items() if "durable" in tiers)
        assert durable == [s for s in range(1, last) if s % persist_every == 0], (
            mode
        )  # the killed one never is


def test_three_nodes_each_copy_partial_restore_after_losing_one(tmp_path: Path) -> None:
    root, fast = tmp_path / "root", f"{tmp_path}/fast/{{node}}"
    records = _ok(
        tmp_path, "save", *run_job(tmp_path, "save", "save", root, fast, 1, 2, nnodes=3, nproc=1), world=3
    )
    node_of = {r: rec["node"] for r, rec in records.items()}
    # Each node holds its own part and the part of the node before it: 2 of the 3 data files.
    for node in range(3):
        assert len(list((tmp_path / "fast" / str(node) / "step-2").glob("data-*.bin"))) == 2
    lost = node_of[1]
    shutil.rmtree(tmp_path / "fast" / str(lost))
    # Restore twice in one launch: then with the one copy left of rank 1's part (on the next
    # node, which sends it) cut short: a damaged copy a node serves falls back to the root.
    kept = _data_file(tmp_path / "fast" / str((lost + 1) % 3) / "step-2", 1)
    codes, records = run_job(
        tmp_path, "restore", "restore", f"{root},{root}", f"{fast},{fast}", nnodes=3, nproc=1,
        env={"TIERED_CUT_BEFORE_RUN": f"1:{kept}"},
    )  # fmt: skip
    records = _ok(tmp_path, "restore", codes, records, world=3)
    first, second = ([r["runs"][k] for r in records.values()] for k in (0, 1))
    assert {(r["restored"], r["exact"], r["root_read"]) for r in first} == {(2, True, 0)}
    assert {(r["restored"], r["exact"]) for r in second} == {(2, True)}
    assert sum(r["root_read"] for r in second) > 0  # rank 1's part came from the root
