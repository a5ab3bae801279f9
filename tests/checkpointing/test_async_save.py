"""torchstow.async_save in one process: staging, commits in order, one save in flight, errors."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import pytest
import torch

import torchstow
from torchstow import CheckpointException, CheckpointExistsError, UnknownBackendError
from torchstow.checkpointing import CheckpointStagerConfig, DefaultStager, StateDictStager
from torchstow.checkpointing.async_save import pipeline
from torchstow.planning import DefaultSavePlanner, WriteItem

from waits import wait_until


class GatedPlanner(DefaultSavePlanner):
    """Holds every write until ``gate`` is set, and records commit order."""

    def __init__(self, name: str, log: list[str], gate: threading.Event | None = None) -> None:
        super().__init__()
        self.name, self.log, self.gate = name, log, gate

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if self.gate is not None:
            assert self.gate.wait(30)
        return super().resolve_data(write_item)

    def create_global_plan(self, all_plans: Any) -> Any:
        self.log.append(self.name)
        return super().create_global_plan(all_plans)


def _state() -> dict[str, Any]:
    return {"w": torch.arange(1000.0), "opt": {"step": 3, "m": torch.ones(10)}, "tag": "x"}


def test_async_save_commits_and_reads_back(tmp_path: Any) -> None:
    sd = _state()
    save = torchstow.async_save(sd, tmp_path / "ckpt", metadata={"step": 3})
    save.staged()
    metadata = save.result(timeout=30)
    assert save.done()
    assert save.exception() is None
    assert metadata.user_metadata == {"step": 3}
    assert (tmp_path / "ckpt" / "manifest.json").exists()
    loaded = torchstow.read(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], sd["w"])
    assert loaded["opt"]["step"] == 3
    assert loaded["tag"] == "x"


def test_training_may_mutate_once_staged(tmp_path: Any) -> None:
    sd = _state()
    gate = threading.Event()
    save = torchstow.async_save(sd, tmp_path / "ckpt", planner=GatedPlanner("a", [], gate))
    save.staged()
    sd["w"].add_(1)  # while the write is held back
    sd["opt"]["m"].zero_()
    gate.set()
    save.result(timeout=30)
    loaded = torchstow.read(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], torch.arange(1000.0))
    assert torch.equal(loaded["opt"]["m"], torch.ones(10))


def test_consecutive_saves_commit_in_call_order(tmp_path: Any) -> None:
    sd = _state()
    log: list[str] = []
    stagers = [StateDictStager() for _ in range(4)]  # distinct buffers: no waiting between them
    saves = [
        torchstow.async_save(sd, tmp_path / f"step-{i}", planner=GatedPlanner(str(i), log), stager=stagers[i])
        for i in range(4)
    ]
    metadata = [save.result(timeout=30) for save in saves]
    assert log == ["0", "1", "2", "3"]
    assert [m.committed_at for m in metadata] == sorted(m.committed_at for m in metadata)
    assert torchstow.latest(tmp_path) == str(tmp_path / "step-3")


def test_a_save_waits_for_the_previous_one_to_finish_writing(tmp_path: Any) -> None:
    sd = _state()
    stager = StateDictStager()
    gate = threading.Event()
    first = torchstow.async_save(sd, tmp_path / "a", planner=GatedPlanner("a", [], gate), stager=stager)
    first.staged()
    buffers = stager.cache_stats()
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(torchstow.async_save, sd, tmp_path / "b", stager=stager)
        # it would overwrite the buffers the first save is writing: it must not finish while the
        # first is held (a window, for what must not happen has no event to wait on)
        assert not wait([second], timeout=0.3).done
        gate.set()
        second.result(timeout=30).result(timeout=30)
    assert first.done()
    assert stager.cache_stats() == buffers  # one staged copy, reused
    assert torch.equal(torchstow.read(tmp_path / "a")["w"], torchstow.read(tmp_path / "b")["w"])


def test_the_default_stager_keeps_one_staged_copy(tmp_path: Any) -> None:
    stager = pipeline().default_stager()
    gc.collect()
    before = stager.cache_stats()
    sd = {"w": torch.randn(256, 256)}
    for i in range(3):
        sd["w"].add_(1)
        torchstow.async_save(sd, tmp_path / f"s{i}").result(timeout=30)
        assert torch.equal(torchstow.read(tmp_path / f"s{i}")["w"], sd["w"])
        assert stager.cache_stats() == (before[0] + 1, before[1] + 256 * 256 * 4)


def test_background_staging_needs_staged_before_mutating(tmp_path: Any) -> None:
    sd = _state()
    with DefaultStager(CheckpointStagerConfig(use_async_staging=True)) as stager:
        save = torchstow.async_save(sd, tmp_path / "ckpt", stager=stager)
        save.staged(timeout=30)
        sd["w"].zero_()
        save.result(timeout=30)
    assert torch.equal(torchstow.read(tmp_path / "ckpt")["w"], torch.arange(1000.0))


def test_errors_surface_on_result_and_the_next_save_works(tmp_path: Any) -> None:
    sd = _state()
    unknown = torchstow.async_save(sd, "nosuchscheme://bucket/x")
    with pytest.raises(UnknownBackendError, match="nosuchscheme"):
        unknown.staged()
    with pytest.raises(CheckpointException) as info:
        unknown.result(timeout=30)
    assert isinstance(info.value, UnknownBackendError)
    assert set(info.value.failures) == {0}

    torchstow.async_save(sd, tmp_path / "ckpt").result(timeout=30)
    exists = torchstow.async_save(sd, tmp_path / "ckpt")
    with pytest.raises(CheckpointExistsError):
        exists.result(timeout=30)
    assert isinstance(exists.exception(), CheckpointException)
    torchstow.async_save(sd, tmp_path / "ckpt", overwrite=True).result(timeout=30)


def test_a_staging_failure_fails_the_save(tmp_path: Any) -> None:
    save = torchstow.async_save({"lock": threading.Lock()}, tmp_path / "ckpt")
    with pytest.raises(TypeError):
        save.staged()
    with pytest.raises(CheckpointException) as info:
        save.result(timeout=30)
    assert isinstance(info.value.failures[0][0], TypeError)
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


def test_done_callback_and_repr(tmp_path: Any) -> None:
    done = threading.Event()
    save = torchstow.async_save(_state(), tmp_path / "ckpt")
    save.add_done_callback(lambda s: done.set())
    assert done.wait(30)
    assert "done" in repr(save)
    assert str(tmp_path / "ckpt") in repr(save)


def test_file_uris_work_like_paths(tmp_path: Any) -> None:
    sd = _state()
    torchstow.async_save(sd, f"file://{tmp_path}/ckpt").result(timeout=30)
    assert torch.equal(torchstow.read(tmp_path / "ckpt")["w"], sd["w"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_async_save_from_the_gpu(tmp_path: Any) -> None:
    sd = {"w": torch.randn(512, 512, device="cuda"), "step": 1}
    expected = sd["w"].cpu()
    save = torchstow.async_save(sd, tmp_path / "ckpt")
    save.staged()
    sd["w"].add_(1)  # the staged copy was taken before this kernel
    save.result(timeout=60)
    assert torch.equal(torchstow.read(tmp_path / "ckpt")["w"], expected)


class ReportingPlanner(GatedPlanner):
    """A :class:`GatedPlanner` that says when the write has begun."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__("a", [], gate)
        self.writing = threading.Event()

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        self.writing.set()
        return super().resolve_data(write_item)


def test_stats_are_partial_while_the_save_runs_and_whole_once_done(tmp_path: Any) -> None:
    gate = threading.Event()
    planner = ReportingPlanner(gate)
    save = torchstow.async_save(_state(), tmp_path / "ckpt", planner=planner)
    try:
        assert planner.writing.wait(30)
        running = save.stats
        assert list(running.seconds) == ["stage", "plan", "coordinate"]  # writing: not done yet
        assert running.bytes_staged == 1000 * 4 + 10 * 4 and running.bytes_written == 0
    finally:
        gate.set()
    save.result(timeout=30)
    assert list(save.stats.seconds) == ["stage", "plan", "coordinate", "write", "commit"]
    assert save.stats.bytes_written == 1000 * 4 + 10 * 4
    assert list(running.seconds) == ["stage", "plan", "coordinate"]  # a copy, taken when asked


class HeldStager:
    """Stages on a thread of its own once ``release`` is set (a future, as DCP's stagers give)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.pool = ThreadPoolExecutor(1)

    def stage(self, state_dict: Any) -> Any:
        def copy() -> Any:
            assert self.release.wait(30)
            return StateDictStager().stage(state_dict)

        return self.pool.submit(copy)

    def close(self) -> None:
        self.pool.shutdown()


def test_background_staging_is_timed_to_its_end_and_counted_before_staged_returns(tmp_path: Any) -> None:
    stager = HeldStager()
    try:
        save = torchstow.async_save(_state(), tmp_path / "ckpt", stager=stager)
        assert save.stats.seconds == {} and save.stats.bytes_staged == 0  # staging is held
        stager.release.set()
        save.staged(timeout=30)
        assert "stage" in save.stats.seconds and save.stats.bytes_staged == 1000 * 4 + 10 * 4
        save.result(timeout=30)
    finally:
        stager.close()
    assert list(save.stats.seconds) == ["stage", "plan", "coordinate", "write", "commit"]


EXITING_TRAINER = """
import sys, torch, torchstow
from torchstow.checkpointing import make_async_checkpointer

if __name__ == "__main__":
    out = sys.argv[1]
    state = {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(16)}  # 16 MiB: 2 writing threads
    torchstow.async_save(state, f"faulty+file://{out}/async?fail=set_up_storage_writer&mode=delay")
    writer = make_async_checkpointer()
    writer.save(f"{out}/writer", state)
    print(writer.process.pid, flush=True)
    raise RuntimeError("the training loop failed while its saves were on their way")
"""


def test_saves_on_their_way_when_the_interpreter_exits_commit(tmp_path: Any) -> None:
    """A trainer that raises (or exits) without waiting for its saves or closing anything.

    - async_save: documented, pending saves finish before the interpreter exits. The save
      thread was joined, but its writer's thread pool was refused ("cannot schedule new
      futures after interpreter shutdown"), so the save failed where nobody saw it (it waits
      1 s before writing, so the interpreter exits while it is in flight);
    - (a tiered manager's step: tests/tiered/test_tiered_local.py, on its own, as this
      save would keep the interpreter long enough for the step to finish);
    - the writer process: it ignores SIGTERM, with which multiprocessing stops a daemonic
      child at exit before joining it, so the trainer would wait for it forever.
    """
    done = subprocess.run(
        [sys.executable, "-c", EXITING_TRAINER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "the training loop failed" in done.stderr, done.stderr
    for saved in (tmp_path / "async", tmp_path / "writer"):
        values = torchstow.read(str(saved))
        assert all(torch.equal(values[f"w{i}"], torch.full((1 << 18,), float(i))) for i in range(16)), saved
    writer_pid = int(done.stdout)
    wait_until(lambda: not os.path.exists(f"/proc/{writer_pid}"), 30, "the writer process to exit")


def test_a_commit_group_vote_one_rank_gave_up_on_fails_on_every_rank(monkeypatch: Any) -> None:
    """The ranks of an async_save vote through torch.distributed's store on whether their
    commit group broke. Rank 0 gives up on a vote (rank 1 came later than the timeout); rank
    1 must not then pass it alone: before, it did, and on a lost group made a new group
    alone, which put torch's group names out of step for good. Both then meet in the next
    vote. (Two ranks in one process: each is a pipeline on a thread, over one store.)"""
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from torchstow.checkpointing.async_save import AsyncSavePipeline
    from torchstow.core.protocol import collective
    from torchstow.errors import CheckpointTimeoutError

    class Group:  # a commit group: rank 1 lost contact on it
        pass

    store, rank, broken = dist.HashStore(), threading.local(), Group()
    monkeypatch.setattr(distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(dist, "get_rank", lambda: rank.value)
    collective._broken.add(broken)  # gone with ``broken``
    pipelines = (AsyncSavePipeline(), AsyncSavePipeline())

    def vote(r: int, seconds: float = 30) -> bool | str:
        rank.value = r
        try:
            return pipelines[r]._lost_anywhere((0, 1), broken, datetime.timedelta(seconds=seconds))
        except CheckpointTimeoutError:
            return "timed out"

    assert vote(0, 0.3) == "timed out"  # rank 1 is late
    assert vote(1) == "timed out"  # at once; before: True (it went on alone to make a new group)
    with ThreadPoolExecutor(2) as pool:  # in step at the next vote
        assert list(pool.map(vote, (0, 1))) == [True, True]
