"""prune and CheckpointManager: retention for a training loop, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow import CheckpointInfo
from torchstow.management.prune import plan_prune


def _infos(*steps: int | None) -> list[CheckpointInfo]:
    return [CheckpointInfo(f"/r/{s}", s, float(i), 1, 1, {}, 1) for i, s in enumerate(steps)]


def _steps(infos: list[CheckpointInfo]) -> list[int | None]:
    return [i.step for i in infos]


def test_plan_prune_keeps_the_newest_and_the_milestones() -> None:
    found = _infos(None, 1, 2, 3, 4, 5, 6)
    assert _steps(plan_prune(found, keep_last=2)) == [None, 1, 2, 3, 4]
    assert _steps(plan_prune(found, keep_last=2, keep_every=3)) == [None, 1, 2, 4]
    assert _steps(plan_prune(found, keep_last=0)) == [None, 1, 2, 3, 4, 5]  # never the newest
    assert _steps(plan_prune(found, keep_last=0, keep_every=2)) == [None, 1, 3, 5]
    assert plan_prune(found, keep_last=10) == []
    assert plan_prune([], keep_last=1) == []
    # the step a manager just committed stays, even below the newest ones
    assert _steps(plan_prune(found, keep_last=1, keep_steps=(2,))) == [None, 1, 3, 4, 5]
    for bad in ({"keep_last": -1}, {"keep_last": 1, "keep_every": 0}, {"keep_last": True}):
        with pytest.raises(ValueError, match="keep_"):
            plan_prune(found, **bad)  # type: ignore[arg-type]


def test_prune_a_directory(tmp_path: Path) -> None:
    for step in range(1, 7):
        torchstow.save({"w": torch.full((4,), float(step))}, str(tmp_path / f"step-{step}"))
    torchstow.save({"w": torch.zeros(4)}, str(tmp_path / "s3"))  # no step in its name: not counted
    (tmp_path / "step-9").mkdir()  # not committed: left alone
    (tmp_path / "step-9" / "data-aaaaaaaaaaaa-0-0.bin").write_bytes(b"x")
    would = torchstow.prune(tmp_path, keep_last=2, keep_every=3, dry_run=True)
    assert would == [str(tmp_path / n) for n in ("step-1", "step-2", "step-4")]
    assert len(torchstow.list_checkpoints(tmp_path)) == 7
    assert torchstow.prune(tmp_path, keep_last=2, keep_every=3) == would
    assert [i.step for i in torchstow.list_checkpoints(tmp_path)] == [None, 3, 5, 6]
    assert sorted(os.listdir(tmp_path)) == ["s3", "step-3", "step-5", "step-6", "step-9"]


def _model_state(value: float) -> dict[str, object]:
    return {"w": torch.full((8, 8), value), "b": torch.full((8,), -value), "epoch": int(value)}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_manager_saves_prunes_and_restores(tmp_path: Path, asynchronous: bool) -> None:
    root = tmp_path / "run"
    with torchstow.CheckpointManager(root, keep_last=2, keep_every=100) as manager:
        assert manager.latest_step() is None and manager.steps() == []
        for step in (50, 100, 150, 200, 250):
            saved = manager.save(
                step, _model_state(step), metadata={"loss": 1 / step}, asynchronous=asynchronous
            )
            assert (saved is None) is not asynchronous
        manager.wait()
        assert manager.steps() == [100, 200, 250]
        assert manager.latest_step() == 250
        info = torchstow.info(manager.uri(250))
        assert info.user_metadata == {"loss": 1 / 250, "step": 250} and info.step == 250
        target = _model_state(0)
        assert manager.restore(target) == 250
        assert torch.equal(target["w"], torch.full((8, 8), 250.0)) and target["epoch"] == 250
        assert manager.restore(target, step=100) == 100
        assert torch.equal(target["b"], torch.full((8,), -100.0))
    assert sorted(os.listdir(root)) == ["step-100", "step-200", "step-250"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_incremental_manager_shares_unchanged_tensors_and_its_steps_outlive_their_bases(
    tmp_path: Path, asynchronous: bool
) -> None:
    root = tmp_path / "run"
    frozen = torch.randn(256, 1024)  # 1 MiB that never changes

    def state(step: int) -> dict[str, object]:
        return {"frozen": frozen, "trainable": torch.full((16,), float(step)), "epoch": step}

    with torchstow.CheckpointManager(root, keep_last=2, incremental=True) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, state(step), asynchronous=asynchronous, trust_version_counter=True)
    assert manager.steps() == [3, 4]  # 1 and 2, the bases of 2 and 3, are pruned
    written = {step: torchstow.info(manager.uri(step)).nbytes_written for step in (3, 4)}
    assert all(nbytes < frozen.numel() * 4 for nbytes in written.values()), written
    for step in (3, 4):
        got = torchstow.read(manager.uri(step))
        assert torch.equal(got["frozen"].view(torch.uint8), frozen.view(torch.uint8))
        assert torch.equal(got["trainable"], torch.full((16,), float(step))) and got["epoch"] == step
    # a new manager (a restarted run) bases its first save on the newest committed step
    again = torchstow.CheckpointManager(root, keep_last=2, incremental=True)
    again.save(5, state(5))
    assert torchstow.info(again.uri(5)).nbytes_written < frozen.numel() * 4
    assert torch.equal(torchstow.read(again.uri(5))["frozen"], frozen)


def test_an_incremental_manager_refuses_a_store_that_cannot_share_files() -> None:
    with pytest.raises(ValueError, match="cannot share files"):
        torchstow.CheckpointManager("memory://torchstow-test/run", incremental=True)
    torchstow.CheckpointManager("memory://torchstow-test/run")  # a plain one is fine there


def test_a_plain_manager_writes_everything(tmp_path: Path) -> None:
    frozen = torch.randn(256, 1024)
    manager = torchstow.CheckpointManager(tmp_path / "run")
    for step in (1, 2):
        manager.save(step, {"frozen": frozen})
    assert torchstow.info(manager.uri(2)).nbytes_written >= frozen.numel() * 4


def test_manager_errors(tmp_path: Path) -> None:
    manager = torchstow.CheckpointManager(tmp_path / "empty")
    with pytest.raises(torchstow.CheckpointNotFoundError):
        manager.restore({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="step"):
        manager.save(-1, {"w": torch.zeros(1)})
    # before: a CheckpointException from the load of <root>/step--1 (step="3": step-3 loaded,
    # and "3" returned), and a manager of "" kept its steps at /step-<n>, the filesystem's root
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="step must be a non-negative integer"):
            manager.restore({"w": torch.zeros(1)}, step=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        torchstow.CheckpointManager("")
    with pytest.raises(ValueError, match="keep_every"):
        torchstow.CheckpointManager(tmp_path, keep_last=1, keep_every=0)
    failing = torchstow.CheckpointManager(tmp_path / "run", keep_last=1)
    failing.save(1, {"w": torch.zeros(1)})
    pending = failing.save(2, {"w": torch.zeros(1)}, asynchronous=True)
    assert pending is not None
    failing.wait()
    torchstow.save({"w": torch.ones(1)}, failing.uri(3))  # another writer's checkpoint at step 3
    failing.save(3, {"w": torch.ones(1)}, asynchronous=True)
    with pytest.raises(torchstow.CheckpointException, match="already exists"):  # nothing is pruned
        failing.wait()
    failing.wait()  # the failure is raised once
    assert failing.steps() == [2, 3]


def test_saving_a_step_the_manager_already_has_saves_nothing_unless_overwrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    manager = torchstow.CheckpointManager(root, keep_last=2)
    manager.save(1, {"w": torch.zeros(4)})
    with caplog.at_level("WARNING", logger="torchstow"):
        assert manager.save(1, {"w": torch.ones(4)}, asynchronous=True) is None
    assert "already committed" in caplog.text
    assert torch.equal(torchstow.read(manager.uri(1))["w"], torch.zeros(4))
    manager.save(1, {"w": torch.ones(4)}, overwrite=True)
    assert torch.equal(torchstow.read(manager.uri(1))["w"], torch.ones(4))
    # a restarted run restores step 1 and may save it again: nothing is written
    restarted = torchstow.CheckpointManager(root, keep_last=2)
    target = {"w": torch.zeros(4)}
    assert restarted.restore(target) == 1
    restarted.save(1, {"w": torch.full((4,), 7.0)})
    assert torch.equal(torchstow.read(manager.uri(1))["w"], torch.ones(4))
    # a step this manager neither saved nor restored is another writer's: refused
    torchstow.save({"w": torch.zeros(4)}, manager.uri(2))
    with pytest.raises(torchstow.CheckpointException, match="already exists"):
        restarted.save(2, {"w": torch.ones(4)})


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_incremental_manager_whose_newest_step_was_deleted_or_damaged_goes_on(
    tmp_path: Path, asynchronous: bool, caplog: pytest.LogCaptureFixture
) -> None:
    frozen = torch.randn(256, 1024)

    def state(step: int) -> dict[str, object]:
        return {"frozen": frozen, "trainable": torch.full((16,), float(step))}

    manager = torchstow.CheckpointManager(tmp_path / "run", incremental=True)
    for step in (1, 2):
        manager.save(step, state(step), asynchronous=asynchronous)
    manager.wait()
    torchstow.delete(manager.uri(2))  # the base of the next save is gone: step 1 serves
    with caplog.at_level("WARNING", logger="torchstow"):
        manager.save(3, state(3), asynchronous=asynchronous)
        manager.wait()
        os.truncate(Path(manager.uri(3), "manifest.json"), 100)  # step 3 is damaged: step 1 serves
        manager.save(4, state(4), asynchronous=asynchronous)
        manager.wait()
    assert "is not saved against step 2" in caplog.text and "is not saved against step 3" in caplog.text
    assert torchstow.info(manager.uri(4)).nbytes_written < frozen.numel() * 4  # shared with step 1
    torchstow.delete(manager.uri(1))
    got = torchstow.read(manager.uri(4))
    assert torch.equal(got["frozen"], frozen) and torch.equal(got["trainable"], torch.full((16,), 4.0))
    assert manager.steps() == [4]


@pytest.mark.parametrize("keep_last", [1, 2])
def test_a_save_below_the_newest_step_after_a_restore_is_refused_and_loses_nothing(
    tmp_path: Path, keep_last: int
) -> None:
    root = tmp_path / "run"
    with torchstow.CheckpointManager(root) as first:
        for step in (20, 30):
            first.save(step, {"w": torch.full((4,), float(step))})
    manager = torchstow.CheckpointManager(root, keep_last=keep_last)
    assert manager.restore({"w": torch.zeros(4)}, step=20) == 20
    # before: step 21 was saved, then pruned (keep_last=1) or pruned at the next save, and a
    # restore loaded the abandoned step 30
    for options in ({}, {"overwrite": True}, {"asynchronous": True}):
        with pytest.raises(torchstow.CheckpointExistsError, match=r"older than the committed step.* 30"):
            manager.save(21, {"w": torch.ones(4)}, **options)  # type: ignore[arg-type]
    assert sorted(os.listdir(root)) == ["step-20", "step-30"]
    torchstow.delete(manager.uri(30))  # what the error says to do: the run goes on from step 20
    for step in (21, 22):
        manager.save(step, {"w": torch.full((4,), float(step))})
    assert manager.steps() == [20, 21, 22][-keep_last:]
    target = {"w": torch.zeros(4)}
    assert manager.restore(target) == 22 and torch.equal(target["w"], torch.full((4,), 22.0))


def test_restore_loads_the_newest_step_wherever_it_lies(tmp_path: Path) -> None:
    # steps() counts every committed checkpoint under the root, named as step_of reads it
    # (iter_0001000, step-007): restore() loads the one it names, not <root>/step-<n>
    root = tmp_path / "run"
    manager = torchstow.CheckpointManager(root)
    manager.save(3, _model_state(3))
    torchstow.save(_model_state(7), str(root / "iter_0000007"))
    assert manager.steps() == [3, 7] and manager.latest_step() == 7
    target = _model_state(0)
    assert torchstow.CheckpointManager(root).restore(target) == 7
    assert torch.equal(target["w"], torch.full((8, 8), 7.0))


def test_prune_and_gc_never_go_through_a_symbolic_link(tmp_path: Path) -> None:
    # a "latest" link to the newest step: pruning it as a checkpoint of its own deleted
    # the files of the step it pointed at, a step that retention keeps
    root = tmp_path / "run"
    manager = torchstow.CheckpointManager(root, keep_last=2)
    outside, debris = tmp_path / "archive", tmp_path / "killed"
    torchstow.save(_model_state(1), str(outside), metadata={"step": 1})
    debris.mkdir()
    (debris / "data-aaaaaaaaaaaa-0-0.bin").write_bytes(b"x")  # an incomplete checkpoint
    os.makedirs(root)
    os.symlink(outside, root / "best")
    os.symlink(debris, root / "killed")
    for step in (2, 3, 4):
        manager.save(step, _model_state(step))
        if (root / "latest").is_symlink():
            (root / "latest").unlink()
        os.symlink(f"step-{step}", root / "latest")
    assert sorted(os.listdir(root)) == ["best", "killed", "latest", "step-3", "step-4"]
    assert torchstow.gc(root, older_than=0).removed == []
    assert os.listdir(debris) == ["data-aaaaaaaaaaaa-0-0.bin"]
    for uri in (manager.uri(3), manager.uri(4), str(outside)):
        assert torchstow.verify(uri).ok
    target = _model_state(0)
    assert torchstow.CheckpointManager(root).restore(target) == 4  # a link is still read
    assert torch.equal(target["w"], torch.full((8, 8), 4.0))


def test_a_managers_retention_counts_and_deletes_only_its_own_steps(tmp_path: Path) -> None:
    # before: every committed checkpoint under the root counted, those without a step first,
    # so a user's "best", a DCP export and an odd-named step were pruned as the oldest steps
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "run"
    torchstow.save(_model_state(0), str(root / "best"))
    torchstow.save(_model_state(1), str(root / "best-of-epoch"), metadata={"step": 1})
    torchstow.save(_model_state(1), str(root / "iter_0000001"))
    dcp.save(_model_state(1), checkpoint_id=str(root / "exported"), no_dist=True)
    theirs = ["best", "best-of-epoch", "exported", "iter_0000001"]
    manager = torchstow.CheckpointManager(root, keep_last=2)
    for step in (2, 3, 4, 5):
        manager.save(step, _model_state(step))
    assert sorted(os.listdir(root)) == [*theirs, "step-4", "step-5"]
    # torchstow.prune of the root counts every checkpoint with a step (its metadata's, else its name's)
    assert torchstow.prune(root, keep_last=2, dry_run=True) == [str(root / n) for n in theirs[1::2]]


def test_the_refusal_of_an_older_step_names_where_the_newer_steps_lie(tmp_path: Path) -> None:
    # before: it said torchstow.delete(manager.uri(n)), <root>/step-30, which is not there
    root = tmp_path / "run"
    torchstow.CheckpointManager(root).save(20, _model_state(20))
    newer = [str(root / "iter_0000030"), str(root / "step-040")]
    for uri in newer:
        torchstow.save(_model_state(1), uri)
    manager = torchstow.CheckpointManager(root)
    manager.restore(_model_state(0), step=20)
    with pytest.raises(torchstow.CheckpointExistsError) as refused:
        manager.save(21, _model_state(21))
    assert f"`torchstow rm URI`: {newer[0]}, {newer[1]})" in str(refused.value)
    for uri in newer:  # what it says to do
        torchstow.delete(uri)
    manager.save(21, _model_state(21))
    assert manager.steps() == [20, 21]


def test_restore_of_a_given_step_loads_it_wherever_it_lies(tmp_path: Path) -> None:
    # steps() counts iter_0000007 as step 7; before: restore(step=7) looked only at
    # <root>/step-7 and raised CheckpointNotFoundError
    root = tmp_path / "run"
    for step in (7, 9):
        torchstow.save(_model_state(step), str(root / f"iter_{step:07d}"))
    manager = torchstow.CheckpointManager(root)
    assert manager.steps() == [7, 9]
    target = _model_state(0)
    assert manager.restore(target, step=7) == 7
    assert torch.equal(target["w"], torch.full((8, 8), 7.0))
    with pytest.raises(torchstow.CheckpointNotFoundError, match="step-8"):
        manager.restore(target, step=8)


def test_a_users_best_under_the_root_is_no_step_of_the_manager(tmp_path: Path) -> None:
    # a "best" whose user metadata holds a step above the run's (kept from a timeline the run
    # left, or saved by hand): before, steps() listed it, restore() loaded it as the newest
    # step and a save of the next step was refused as older than it
    root = tmp_path / "run"
    manager = torchstow.CheckpointManager(root, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, _model_state(step))
    torchstow.save(_model_state(99), str(root / "best"), metadata={"step": 5})
    manager = torchstow.CheckpointManager(root, keep_last=2)
    assert manager.steps() == [2, 3] and manager.latest_step() == 3
    target = _model_state(0)
    assert manager.restore(target) == 3 and torch.equal(target["w"], torch.full((8, 8), 3.0))
    with pytest.raises(torchstow.CheckpointNotFoundError, match="step-5"):
        manager.restore(target, step=5)
    manager.save(4, _model_state(4))
    assert manager.steps() == [3, 4]
    assert sorted(os.listdir(root)) == ["best", "step-3", "step-4"]
