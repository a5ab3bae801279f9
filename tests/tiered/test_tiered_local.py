"""Tiered checkpoints in one process (one node): persist failures, the root as the last
source, node identity and replica placement."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow import CheckpointManager, verify
from torchstow.backends.filesystem import LocalFileStore
from torchstow.backends.shm import default_shm_dir
from torchstow.errors import CheckpointException, CheckpointExistsError, CheckpointNotFoundError
from torchstow.management.tiered import StepInfo, node_index
from torchstow.management.tiered.listing import tier_listing
from torchstow.management.tiered.manager import TieredManager, _FilesWriter
from torchstow.management.tiered.nodes import Topology
from torchstow.plugins import manager as plugins
from torchstow.testing.counting import bytes_read, install_counting, read_calls


def _state(step: int) -> dict:
    return {"w": torch.arange(1000, dtype=torch.float32) * step, "meta": {"step": step}}


def _empty() -> dict:
    return {"w": torch.zeros(1000), "meta": {"step": -1}}


@pytest.fixture
def shm_fast():
    name = f"tiered-test-{uuid.uuid4().hex[:8]}"
    yield f"shm://{name}/{{node}}", Path(default_shm_dir()) / name
    shutil.rmtree(Path(default_shm_dir()) / name, ignore_errors=True)


def test_shm_fast_tier_keeps_newest_and_restores_without_root(
    tmp_path: Path, shm_fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, fast_dir = shm_fast
    monkeypatch.setattr(plugins, "_default", plugins.default_registry())  # count+ for this test only
    install_counting()
    root = f"count+file://{tmp_path}/root"  # every byte read from the root is counted
    with CheckpointManager(root, fast=fast, persist_every=3) as manager:
        for step in range(1, 6):
            manager.save(step, _state(step)).result()
        assert manager.steps() == [
            StepInfo(3, ("durable",)),
            StepInfo(4, ("fast",)),
            StepInfo(5, ("fast",)),
        ]
        assert sorted(p.name for p in (fast_dir / "0").glob("step-*")) == ["step-4", "step-5"]
        target, before = _empty(), bytes_read()
        assert manager.restore(target) == 5
        assert bytes_read() == before  # nothing read from the root
        assert torch.equal(target["w"], _state(5)["w"]) and target["meta"] == {"step": 5}
        target, before = _empty(), bytes_read()
        assert manager.restore(target, step=3) == 3  # no longer in the fast tier: from the root
        assert bytes_read() - before >= target["w"].nbytes  # (which the count sees)
        assert torch.equal(target["w"], _state(3)["w"])
        with pytest.raises(CheckpointNotFoundError):
            manager.restore(_empty(), step=1)  # in no tier


def test_a_restore_from_the_root_reads_in_the_roots_segment_size(
    tmp_path: Path, shm_fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object store wants few big reads: a root restore asks for the root store's
    segment size, not the 1 MiB a local store reads at a time."""
    monkeypatch.setattr(plugins, "_default", plugins.default_registry())  # count+ for this test only
    install_counting()
    monkeypatch.setattr(LocalFileStore, "read_segment_bytes", 64 << 20)  # the root's wish
    fast, fast_dir = shm_fast
    big = {"w": torch.arange(1 << 20, dtype=torch.float32)}  # 4 MiB
    with CheckpointManager(f"count+file://{tmp_path}/root", fast=fast) as manager:
        manager.save(1, big).result()
    shutil.rmtree(fast_dir)
    with CheckpointManager(f"count+file://{tmp_path}/root", fast=fast) as manager:
        target, calls = {"w": torch.zeros(1 << 20)}, read_calls()
        assert manager.restore(target) == 1 and torch.equal(target["w"], big["w"])
        # the manifest and its chunk table twice (listing, loading), the 4 MiB in one read
        assert read_calls() - calls == 5


def test_saving_after_restoring_an_older_step_leaves_its_timeline(tmp_path: Path, shm_fast) -> None:
    fast, fast_dir = shm_fast
    with CheckpointManager(tmp_path / "root", fast=fast, persist_every=100, fast_keep=3) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, _state(step)).result()
        target = _empty()
        assert manager.restore(target, step=2) == 2 and torch.equal(target["w"], _state(2)["w"])
        debris = fast_dir / "0" / "step-9"  # what a save killed before its commit leaves
        debris.mkdir()
        (debris / "data-0123456789ab-0-0.bin").write_bytes(b"x" * 64)
        manager.save(3, {"w": torch.full((1000,), -1.0), "meta": {"step": 3}})
        manager.wait("replicated")  # the fast tier is pruned once the step is replicated
        assert sorted(p.name for p in (fast_dir / "0").glob("step-*")) == ["step-2", "step-3"]
        assert manager.latest_step() == 3  # not the abandoned step 4
        target = _empty()
        assert manager.restore(target) == 3 and torch.equal(target["w"], torch.full((1000,), -1.0))


def test_damaged_fast_copy_falls_back_to_root_and_never_to_wrong_values(tmp_path: Path, shm_fast) -> None:
    fast, fast_dir = shm_fast
    root = tmp_path / "root"
    with CheckpointManager(root, fast=fast, persist_every=2) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step)).result()
        # Step 3 lives only in this node's fast tier, step 2 in both tiers; damage both fast copies.
        for step in (2, 3):
            (data,) = (fast_dir / "0" / f"step-{step}").glob("data-*.bin")
            raw = bytearray(data.read_bytes())
            raw[8] ^= 1
            data.write_bytes(bytes(raw))
        target = _empty()
        assert manager.restore(target) == 2  # step 3 has no intact copy anywhere; step 2 from the root
        assert torch.equal(target["w"], _state(2)["w"])
        shutil.rmtree(root)
        with pytest.raises(CheckpointNotFoundError):
            manager.restore(_empty())


def test_failed_persist_surfaces_on_its_handle_and_is_retried(tmp_path: Path, shm_fast) -> None:
    fast, _ = shm_fast
    root = tmp_path / "root"
    root.mkdir()
    (root / "step-1").write_text("not a directory: the persist of step 1 cannot write here")
    with CheckpointManager(root, fast=fast, persist_every=1) as manager:
        first = manager.save(1, _state(1))
        with pytest.raises(CheckpointException):
            first.wait("durable")
        assert first.level == "replicated"
        with pytest.raises(CheckpointException):
            manager.wait()
        (root / "step-1").unlink()
        second = manager.save(2, _state(2))
        assert second.result() == "durable"
        first.wait("durable")  # retried before step 2 was persisted
        assert first.level == "durable" and first.exception() is None
        assert [info.step for info in manager.steps() if "durable" in info.tiers] == [1, 2]


def test_levels_and_stats(tmp_path: Path, shm_fast) -> None:
    with CheckpointManager(tmp_path / "root", fast=shm_fast[0], persist_every=2) as manager:
        handle = manager.save(1, _state(1))
        assert handle.level in ("staged", "fast", "replicated")
        assert handle.result() == "replicated" and handle.due == "replicated"
        assert list(handle.stats) == ["staged", "fast", "replicated"]
        assert handle.stats["staged"].bytes == handle.stats["fast"].bytes == 4000
        handle = manager.save(2, _state(2))
        handle.wait("durable")
        assert list(handle.stats) == ["staged", "fast", "replicated", "durable"]
        assert handle.stats["durable"].bytes == 4000
        with pytest.raises(ValueError, match="unknown level"):
            handle.wait("memory")


def test_a_users_best_under_the_root_is_no_step_of_a_tiered_manager(tmp_path: Path, shm_fast) -> None:
    # before: a best holding step 5 in its user metadata was the newest durable step: restore
    # failed (no torchstow checkpoint at step-5) and saving step 2 was refused as older
    root = tmp_path / "root"
    torchstow.save(_state(99), str(root / "best"), metadata={"step": 5})
    with CheckpointManager(root, fast=shm_fast[0]) as manager:
        manager.save(1, _state(1)).result()
    with CheckpointManager(root, fast=f"{shm_fast[0]}-other") as manager:
        assert manager.steps() == [StepInfo(1, ("durable",))]
        target = _empty()
        assert manager.restore(target) == 1 and torch.equal(target["w"], _state(1)["w"])
        manager.save(2, _state(2)).result()
    assert [row.step for row in tier_listing(str(root), shm_fast[0])[1]] == [1, 2]  # ls --tiers


def test_a_save_waits_for_the_previous_write_not_for_its_pruning(
    tmp_path: Path, shm_fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save blocks for its staging and for the previous step's write (which reads the
    staging buffers), not for the previous step's replication or pruning."""
    pruning, prune_gate = threading.Event(), threading.Event()
    writing, write_gate = threading.Event(), threading.Event()
    prune, write = TieredManager._prune_fast, _FilesWriter.write_data

    def held_prune(self: TieredManager, current: int, newer: bool = True) -> None:
        if current == 1:
            pruning.set()
            prune_gate.wait(60)
        prune(self, current, newer)

    def held_write(self: _FilesWriter, plan: Any, planner: Any) -> Any:
        if self.store.location.endswith("step-2"):
            writing.set()
            write_gate.wait(60)
        return write(self, plan, planner)

    monkeypatch.setattr(TieredManager, "_prune_fast", held_prune)
    monkeypatch.setattr(_FilesWriter, "write_data", held_write)
    state, threads = _state(1), []

    def save_in_thread(step: int) -> threading.Event:
        state["w"].copy_(_state(step)["w"])  # training changes the state in place
        state["meta"] = {"step": step}
        returned = threading.Event()
        threads.append(threading.Thread(target=lambda: (manager.save(step, state), returned.set())))
        threads[-1].start()
        return returned

    with CheckpointManager(tmp_path / "root", fast=shm_fast[0], persist_every=100) as manager:
        try:
            manager.save(1, state)
            assert pruning.wait(60)  # step 1 is replicated; its pruning is held
            assert save_in_thread(2).wait(10), "save(2) waited for step 1's pruning"
            threads[-1].join()
            prune_gate.set()
            assert writing.wait(60)  # step 2's write is held: it reads the staging buffers
            third = save_in_thread(3)
            assert not third.wait(1), "save(3) refilled the staging buffers step 2's write reads"
            write_gate.set()
            assert third.wait(60)
        finally:
            prune_gate.set()
            write_gate.set()
            for thread in threads:
                thread.join()
        manager.wait("replicated")
        for step in (3, 2):
            target = _empty()
            assert manager.restore(target, step=step) == step
            assert torch.equal(target["w"], _state(step)["w"]) and target["meta"] == {"step": step}


def test_incremental_persist_shares_unchanged_tensors(tmp_path: Path, shm_fast) -> None:
    fast, fast_dir = shm_fast
    root = tmp_path / "root"
    frozen = torch.randn(256, 1024)  # 1 MiB that never changes
    with CheckpointManager(root, fast=fast, persist_every=2, incremental=True) as manager:
        handles = [
            manager.save(s, {"frozen": frozen, "w": torch.full((10,), float(s))}) for s in (1, 2, 3, 4)
        ]
        manager.wait()
    assert [h.level for h in handles] == ["replicated", "durable", "replicated", "durable"]
    assert handles[1].stats["durable"].bytes >= frozen.nbytes  # the first persist writes everything
    assert handles[3].stats["durable"].bytes < 1024  # the second shares the frozen tensor's bytes
    for data in (fast_dir / "0" / "step-4").glob("data-*.bin"):
        raw = bytearray(data.read_bytes())
        raw[0] ^= 1
        data.write_bytes(bytes(raw))
    assert not verify(fast.replace("{node}", "0") + "/step-4").ok  # the flips hit checked bytes
    for wiped in (False, True):  # step 4 damaged in the fast tier, then gone: the root's own save of it
        if wiped:
            shutil.rmtree(fast_dir)
        with CheckpointManager(root, fast=fast) as manager:
            target = {"frozen": torch.zeros(256, 1024), "w": torch.zeros(10)}
            assert manager.restore(target) == 4
            assert torch.equal(target["frozen"], frozen) and torch.equal(target["w"], torch.full((10,), 4.0))


def test_a_save_that_cannot_stage_fails_on_its_handle_and_costs_nothing(tmp_path: Path, shm_fast) -> None:
    import threading

    with CheckpointManager(tmp_path / "root", fast=shm_fast[0]) as manager:
        manager.save(1, _state(1)).result()
        bad = manager.save(2, {**_state(2), "lock": threading.Lock()})  # cannot be copied
        with pytest.raises(CheckpointException):
            bad.wait("staged", timeout=30)
        assert bad.level is None and bad.done()
        with pytest.raises(CheckpointException):
            manager.wait()
        target = _empty()
        assert manager.restore(target) == 1 and torch.equal(target["w"], _state(1)["w"])
        assert manager.save(3, _state(3)).result() == "durable"  # the manager goes on


def test_root_is_pruned_with_keep_last(tmp_path: Path, shm_fast) -> None:
    root = tmp_path / "root"
    with CheckpointManager(root, fast=shm_fast[0], keep_last=2, fast_keep=1) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, _state(step))
        manager.wait()
        assert sorted(p.name for p in root.iterdir()) == ["step-3", "step-4"]
        assert [(i.step, i.tiers) for i in manager.steps()] == [(3, ("durable",)), (4, ("fast", "durable"))]


def test_a_save_below_the_newest_durable_step_fails_on_its_handle_and_writes_nothing(
    tmp_path: Path, shm_fast
) -> None:
    fast, fast_dir = shm_fast
    root = tmp_path / "root"
    with CheckpointManager(root, fast=fast, keep_last=1, fast_keep=2) as manager:
        for step in (20, 30):
            manager.save(step, _state(step))
        assert manager.restore(_empty(), step=20) == 20
        # before: step 21 was persisted, then pruned from the root for the abandoned step 30
        refused = manager.save(21, _state(21))
        with pytest.raises(CheckpointExistsError, match=r"older than the committed step.* 30"):
            refused.result()
        assert sorted(p.name for p in root.iterdir()) == ["step-30"]
        assert sorted(p.name for p in (fast_dir / "0").glob("step-*")) == ["step-20", "step-30"]
        shutil.rmtree(root / "step-30")  # the abandoned step gone, the run goes on from step 20
        assert manager.save(21, _state(21)).result() == "durable"
        assert sorted(p.name for p in root.iterdir()) == ["step-21"]


def test_bad_arguments(tmp_path: Path, shm_fast) -> None:
    with pytest.raises(ValueError, match="replicas"):
        CheckpointManager(tmp_path, fast=shm_fast[0], replicas=-1)
    with pytest.raises(ValueError, match="persist_every"):
        CheckpointManager(tmp_path, fast=shm_fast[0], persist_every=0)
    with pytest.raises(ValueError, match="incremental"):
        CheckpointManager("memory://bucket/run", fast=shm_fast[0], incremental=True)  # cannot share files
    with CheckpointManager(tmp_path, fast=shm_fast[0]) as manager, pytest.raises(TypeError):
        manager.save(1, _state(1), overwrite=True)


def test_node_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GROUP_RANK", raising=False)
    monkeypatch.delenv("TORCHSTOW_NODE", raising=False)
    assert node_index() == 0
    monkeypatch.setenv("TORCHSTOW_NODE", "5")
    assert node_index() == 5
    monkeypatch.setenv("GROUP_RANK", "2")
    assert node_index() == 2  # torchrun's node rank first
    monkeypatch.setenv("GROUP_RANK", "two")
    with pytest.raises(ValueError, match="GROUP_RANK"):
        node_index()


def test_replicas_go_to_other_nodes() -> None:
    topology = Topology(0, (0, 0, 1, 1, 2, 2))
    for replicas in (1, 2, 5):
        pairs = topology.replica_pairs(replicas)
        for sender in range(6):
            targets = [topology.nodes[d] for s, d in pairs if s == sender]
            assert len(targets) == len(set(targets)) == min(replicas, 2)  # distinct nodes, never its own
            assert topology.nodes[sender] not in targets
    assert Topology(0, (0, 0)).replica_pairs(1) == []  # one node: nothing to replicate to


def test_ls_tiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from torchstow.cli import main

    root, fast = tmp_path / "root", f"{tmp_path}/fast/{{node}}"
    with CheckpointManager(root, fast=fast, persist_every=2) as manager:
        for step in (1, 2, 3):
            manager.save(step, _state(step)).result()
    # A second simulated node whose copy of step 3 lost a data file: step 3 is still complete
    # (node 0 holds every file).
    shutil.copytree(tmp_path / "fast" / "0", tmp_path / "fast" / "1")
    for data in (tmp_path / "fast" / "1" / "step-3").glob("data-*.bin"):
        data.unlink()
    assert main(["ls", str(root), "--tiers", "--json"]) == 0  # the fast tier is found in the root's steps
    listed = json.loads(capsys.readouterr().out)
    assert listed["fast"] == fast
    assert [(s["step"], s["tiers"], s["fast_nodes"]) for s in listed["steps"]] == [
        (2, ["fast", "durable"], [0, 1]),
        (3, ["fast"], [0, 1]),
    ]
    for data in (tmp_path / "fast" / "0" / "step-3").glob("data-*.bin"):
        data.unlink()  # now no node holds step 3's data
    shutil.rmtree(tmp_path / "fast" / "0" / "step-2")
    assert main(["ls", str(root), "--tiers", "--fast", fast]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:]] == [["2", "fast+durable"]]


def test_a_tiered_save_logs_its_protocol_phases_and_times_each_level(
    tmp_path: Path, shm_fast, caplog: pytest.LogCaptureFixture
) -> None:
    """What a user watching a tiered save sees: the fast-tier save's protocol phases at DEBUG
    (as for any save), and on its handle the bytes and seconds of every level it reached."""
    phase = re.compile(r"^save (\w+) took \d+\.\d{3} s on rank 0$")
    with (
        caplog.at_level(logging.DEBUG, logger="torchstow"),
        CheckpointManager(tmp_path / "root", fast=shm_fast[0], persist_every=1) as manager,
    ):
        handle = manager.save(1, _state(1))
        handle.wait("durable")
    logged = [m[1] for r in caplog.records if (m := phase.match(r.getMessage()))]
    assert logged[:4] == ["plan", "coordinate", "write", "commit"]  # the fast tier's save
    assert list(handle.stats) == ["staged", "fast", "replicated", "durable"]
    assert all(s.seconds >= 0 for s in handle.stats.values())
    assert handle.stats["fast"].bytes == handle.stats["durable"].bytes == 4000


@pytest.mark.parametrize("spelling", ["same", "dot", "file-uri"])
def test_a_fast_tier_that_is_the_root_is_refused(tmp_path: Path, spelling: str) -> None:
    # the fast tier's pruning (fast_keep) would delete durable steps, and every persist
    # copied a step onto itself (FileExistsError, the step never durable)
    root = tmp_path / "run"
    fast = {"same": str(root), "dot": f"{root}/.", "file-uri": f"file://{root}"}[spelling]
    with pytest.raises(ValueError, match="fast tier"):
        CheckpointManager(root, fast=fast)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("newest", ["dcp", "named-otherwise"])
def test_restoring_a_durable_step_that_is_no_torchstow_step_of_its_own_says_so(
    tmp_path: Path, shm_fast, newest: str
) -> None:
    # the root's listing counts it (a DCP-format step-5, an iter_0000005), but the tiered
    # restore reads <root>/step-<n>'s torchstow manifest: it failed with a bare AssertionError
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "root"
    if newest == "dcp":
        dcp.save({"w": torch.zeros(1000)}, checkpoint_id=str(root / "step-5"), no_dist=True)
    else:
        torchstow.save(_state(5), str(root / "iter_0000005"))
    with CheckpointManager(root, fast=shm_fast[0]) as manager:
        assert [s.step for s in manager.steps()] == [5]
        with pytest.raises(CheckpointNotFoundError, match=r"step 5 .* no torchstow checkpoint"):
            manager.restore(_empty())


def test_a_fast_tier_holding_another_runs_steps_is_refused(tmp_path: Path, shm_fast) -> None:
    # two runs (two roots) sharing one fast tier: the second run's restore took the first
    # run's newest step, and its save of step 1 replaced the first run's step 1 and pruned
    # its steps 2 and 3 (the first run then restored the second run's values)
    fast, fast_dir = shm_fast
    with CheckpointManager(tmp_path / "a", fast=fast, persist_every=100) as first:
        for step in (1, 2, 3):
            first.save(step, _state(step))
        first.wait()  # its pruning too
        whose = r"belongs to another run, whose root is .*[/\\]a, not"
        with pytest.raises(ValueError, match=whose) as refused:
            CheckpointManager(tmp_path / "b", fast=fast)
        assert f"(the folder {fast_dir / '0'}) first" in str(refused.value)  # what to remove, on disk
        assert sorted(p.name for p in (fast_dir / "0").glob("step-*")) == ["step-2", "step-3"]
        target = _empty()
        assert first.restore(target) == 3 and torch.equal(target["w"], _state(3)["w"])
    # the same run again (its root however spelled) takes its fast tier up where it was
    with CheckpointManager(f"file://{tmp_path}/a/.", fast=fast) as again:
        target = _empty()
        assert again.restore(target) == 3 and torch.equal(target["w"], _state(3)["w"])
    shutil.rmtree(fast_dir)  # once that run's fast-tier steps are gone, another run may use it
    with CheckpointManager(tmp_path / "b", fast=fast) as second, pytest.raises(CheckpointNotFoundError):
        second.restore(_empty())


EXITING_TRAINER = """
import sys, torch
from torchstow import CheckpointManager
manager = CheckpointManager(sys.argv[1], fast=sys.argv[2])
state = {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(16)}  # 16 MiB: written by 2 threads
manager.save(1, state)
raise RuntimeError("the training loop failed while step 1 was on its way")
"""


def test_a_step_on_its_way_when_the_interpreter_exits_becomes_durable(tmp_path: Path) -> None:
    # A run that ended by an exception (or a SIGTERM handler's SystemExit) outside a with
    # block: the step's fast write and persist ran on after the interpreter had stopped its
    # thread pools taking work, and failed there, unseen; the step never reached the root.
    root = tmp_path / "root"
    done = subprocess.run(
        [sys.executable, "-c", EXITING_TRAINER, str(root), f"{tmp_path}/fast/{{node}}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "the training loop failed" in done.stderr, done.stderr
    saved = torchstow.read(str(root / "step-1"))
    assert all(torch.equal(saved[f"w{i}"], torch.full((1 << 18,), float(i))) for i in range(16))


def test_a_huge_fast_tier_owner_file_is_refused_unread(tmp_path: Path, shm_fast) -> None:
    """A sparse 2 GB torchstow-tier.json (a {"root": ...} of a few bytes when written) names
    no run: the fast tier is refused, saying the owner is unreadable, without reading it."""
    fast, fast_dir = shm_fast
    (fast_dir / "0").mkdir(parents=True)
    owner = fast_dir / "0" / "torchstow-tier.json"
    owner.touch()
    with open(owner, "r+b") as f:
        f.truncate(2 << 30)
    with pytest.raises(ValueError, match=r"whose root is <unreadable: .*holds more than 1,048,576 bytes"):
        CheckpointManager(tmp_path / "root", fast=fast)
    assert owner.stat().st_size == 2 << 30
