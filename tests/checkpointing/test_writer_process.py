"""AsyncCheckpointer and its writer process: real child processes, real shared memory,
start-up failures and timeouts, graceful and forced termination, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import torchstow
from torchstow import CheckpointException
from torchstow.checkpointing import (
    AsyncCheckpointer,
    CheckpointerConfig,
    CheckpointProcess,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    DefaultStager,
    RankInfo,
    StateDictStager,
    WriterHook,
    WriterProcessError,
    WriterProcessTimeoutError,
    make_async_checkpointer,
)
from torchstow.checkpointing.writer_messages import pack_state_dict, unpack_state_dict
from torchstow.core.staging.arena import SHM_DIR, SegmentMapper

from waits import wait_until

pytestmark = pytest.mark.slow


def failing_init(message: str) -> None:
    raise ValueError(message)


def sleeping_init(seconds: float) -> None:
    time.sleep(seconds)


class LoggingHook(WriterHook):
    """Logs each commit (with the writer's pid) to a file; fails or stalls when asked."""

    def __init__(self, log: str) -> None:
        self.log = log

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if kwargs.get("fail"):
            raise ValueError("the hook refused")
        if kwargs.get("stall"):
            open(self.stalling(path), "w").close()  # the gate tests wait on: the write is under way
            time.sleep(kwargs["stall"])  # a writer held mid-write on purpose, until it is killed

    @staticmethod
    def stalling(path: str) -> str:
        """The file a stalled ``pre_commit`` of ``path`` creates once it stalls."""
        return f"{path}.stalling"

    def post_commit(self, path: str, **kwargs: Any) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({"path": path, "kwargs": kwargs, "pid": os.getpid()}) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]


def _config(init_timeout: float = 60, shutdown_timeout: float = 30) -> CheckpointerConfig:
    return CheckpointerConfig(
        process_config=CheckpointProcessConfig(
            subprocess_init_timeout_secs=init_timeout, subprocess_shutdown_timeout_secs=shutdown_timeout
        )
    )


def _state() -> dict[str, Any]:
    w = torch.arange(64 * 1024.0).reshape(64, 1024)
    return {"model": {"w": w, "row": w[3], "b": torch.ones(7, dtype=torch.bfloat16)}, "step": 1, "tag": "t"}


def _shm_files() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"torchstow-{os.getpid()}-")}


@pytest.fixture(scope="module")
def hook(tmp_path_factory: pytest.TempPathFactory) -> LoggingHook:
    return LoggingHook(str(tmp_path_factory.mktemp("log") / "commits.jsonl"))


@pytest.fixture(scope="module")
def checkpointer(hook: LoggingHook) -> Iterator[AsyncCheckpointer]:
    checkpointer = make_async_checkpointer(_config(), commit_hook=hook)
    checkpointer.process.wait_started(60)
    yield checkpointer
    checkpointer.close()


def test_save_and_load_with_hooks_in_the_writer_process(
    checkpointer: AsyncCheckpointer, hook: LoggingHook, tmp_path: Any
) -> None:
    sd = _state()
    path = str(tmp_path / "step-1")
    staging, write = checkpointer.save(path, sd, step=1)
    staging.result(timeout=60)
    sd["model"]["w"].add_(1)  # staged: training may go on
    assert write.result(timeout=60) is None
    loaded = checkpointer.load(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(64 * 1024.0).reshape(64, 1024))
    assert torch.equal(loaded["model"]["b"], torch.ones(7, dtype=torch.bfloat16))
    assert loaded["tag"] == "t"
    entry = hook.entries()[-1]
    assert entry["path"] == path
    assert entry["kwargs"] == {"step": 1}
    assert entry["pid"] == checkpointer.process.pid
    assert entry["pid"] != os.getpid()


def test_a_save_waits_for_the_previous_write(
    checkpointer: AsyncCheckpointer, hook: LoggingHook, tmp_path: Any
) -> None:
    sd = _state()
    _, first = checkpointer.save(str(tmp_path / "a"), sd, stall=0.5)
    start = time.monotonic()
    _, second = checkpointer.save(str(tmp_path / "b"), sd)
    assert first.done()  # the second save staged only after the first was written
    assert time.monotonic() - start >= 0.3
    second.result(timeout=60)
    assert [e["path"] for e in hook.entries()[-2:]] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_a_write_error_surfaces_on_its_future_and_the_next_save_works(
    checkpointer: AsyncCheckpointer, tmp_path: Any
) -> None:
    _, failed = checkpointer.save(str(tmp_path / "bad"), _state(), fail=True)
    with pytest.raises(CheckpointException) as info:
        failed.result(timeout=60)
    error = info.value.failures[0][0]
    assert isinstance(error, ValueError)
    assert "the hook refused" in str(error)
    assert not (tmp_path / "bad" / "manifest.json").exists()
    _, unpicklable = checkpointer.save(str(tmp_path / "bad2"), _state(), callback=lambda: None)
    with pytest.raises(Exception, match="pickle"):
        unpicklable.result(timeout=60)
    _, ok = checkpointer.save(str(tmp_path / "good"), _state())
    ok.result(timeout=60)
    assert torch.equal(checkpointer.load(str(tmp_path / "good"))["model"]["row"], _state()["model"]["row"])


def test_tensors_travel_through_shared_memory_not_the_pipe() -> None:
    sd = _state()
    stager = StateDictStager(share_memory=True)
    staged = stager.stage(sd)
    payload = pack_state_dict(staged, stager.shared_memory)
    assert len(payload) < 2048  # 256 KiB of tensors: only references travel
    mapper = SegmentMapper()
    unpacked = unpack_state_dict(payload, mapper)
    assert torch.equal(unpacked["model"]["w"], sd["model"]["w"])
    assert (
        unpacked["model"]["row"].untyped_storage().data_ptr()
        == unpacked["model"]["w"].untyped_storage().data_ptr()
    )
    assert unpacked["step"] == 1
    with pytest.raises(ValueError, match="not in the stager's shared memory"):
        pack_state_dict({"x": torch.ones(3)}, stager.shared_memory)
    mapper.close()
    stager.close()


def overwriting_writer(rank_info: RankInfo, log: str) -> CheckpointWriter:
    """A custom writer for the writer process: overwrites, and logs commits."""
    return CheckpointWriter(CheckpointWriterConfig(overwrite=True), rank_info, commit_hook=LoggingHook(log))


def test_custom_writer_save_before_start_up_and_graceful_close(tmp_path: Any) -> None:
    log = str(tmp_path / "log.jsonl")
    checkpointer = make_async_checkpointer(
        _config(), checkpoint_writer_init_fn=overwriting_writer, checkpoint_writer_init_args={"log": log}
    )
    path = str(tmp_path / "c")
    _, write = checkpointer.save(path, _state(), n=1)  # queued behind the start-up
    write.result(timeout=60)
    sd = _state()
    sd["step"] = 2
    _, again = checkpointer.save(path, sd, n=2)  # the custom writer overwrites
    again.result(timeout=60)
    assert checkpointer.load(path)["step"] == 2
    assert [e["kwargs"] for e in LoggingHook(log).entries()] == [{"n": 1}, {"n": 2}]
    arena = checkpointer.stager.state_dict_stager.shared_memory
    assert arena is not None
    # The writer removes each segment's name once it has mapped it.
    assert arena.segment_names() and not arena.segment_names() & _shm_files()
    assert arena.stats()[0] > 0
    checkpointer.close()
    assert arena.stats() == (0, 0)
    assert checkpointer.process.exitcode == 0
    assert not checkpointer.process.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        checkpointer.save(path, _state())


def test_start_up_failure_is_reported(tmp_path: Any) -> None:
    checkpointer = make_async_checkpointer(
        _config(), subprocess_init_fn=failing_init, subprocess_init_args=("no disk for you",)
    )
    _, write = checkpointer.save(str(tmp_path / "c"), _state())
    with pytest.raises(WriterProcessError, match="failed to start: ValueError: no disk for you"):
        write.result(timeout=60)
    with pytest.raises(WriterProcessError, match="failed to start"):
        checkpointer.save(str(tmp_path / "c"), _state())  # at once, on the next call
    checkpointer.close()


def test_start_up_timeout_is_reported() -> None:
    checkpointer = make_async_checkpointer(
        _config(init_timeout=1.0), subprocess_init_fn=sleeping_init, subprocess_init_args=(60,)
    )
    start = time.monotonic()
    with pytest.raises(WriterProcessTimeoutError, match=r"did not start within 1s") as info:
        checkpointer.process.wait_started(30)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 15
    assert not checkpointer.process.is_alive()
    checkpointer.close()


def test_close_kills_a_writer_that_does_not_stop(hook: LoggingHook, tmp_path: Any) -> None:
    checkpointer = make_async_checkpointer(_config(shutdown_timeout=1.0), commit_hook=hook)
    _, write = checkpointer.save(str(tmp_path / "c"), _state(), stall=120)
    checkpointer.process.wait_started(60)
    wait_until(lambda: os.path.exists(hook.stalling(str(tmp_path / "c"))), 60, "the write to stall")
    start = time.monotonic()
    checkpointer.close()
    assert time.monotonic() - start < 15
    assert checkpointer.process.exitcode == -signal.SIGKILL
    with pytest.raises(WriterProcessError, match="killed because it did not stop in time"):
        write.result(timeout=10)


def test_a_sigterm_to_the_writer_lets_its_write_commit(
    checkpointer: AsyncCheckpointer, hook: LoggingHook, tmp_path: Any
) -> None:
    # SLURM's preemption (and `kill -TERM -<group>`) signals every process of the job, the
    # writer too: it died at once, mid-write, and the trainer's final save in its grace
    # period could not be written either. The trainer decides when its writer stops.
    path = str(tmp_path / "preempted")
    _, write = checkpointer.save(path, _state(), stall=1.0)
    wait_until(lambda: os.path.exists(hook.stalling(path)), 60, "the write to stall")
    pid = checkpointer.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert write.result(timeout=60) is None
    assert torch.equal(checkpointer.load(path)["model"]["w"], _state()["model"]["w"])
    checkpointer.save(str(tmp_path / "final"), _state())[1].result(timeout=60)  # still writing
    assert checkpointer.process.is_alive()


def test_a_crashed_writer_is_detected(hook: LoggingHook, tmp_path: Any) -> None:
    checkpointer = make_async_checkpointer(_config(), commit_hook=hook)
    checkpointer.process.wait_started(60)
    _, write = checkpointer.save(str(tmp_path / "c"), _state(), stall=120)
    wait_until(lambda: os.path.exists(hook.stalling(str(tmp_path / "c"))), 60, "the write to stall")
    pid = checkpointer.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WriterProcessError, match="killed by SIGKILL while writing"):
        write.result(timeout=10)
    with pytest.raises(WriterProcessError, match="killed by SIGKILL"):
        checkpointer.save(str(tmp_path / "d"), _state())
    checkpointer.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_state_is_staged_into_pinned_shared_memory(tmp_path: Any) -> None:
    checkpointer = make_async_checkpointer(_config())
    try:
        sd = {"w": torch.randn(1024, 1024, device="cuda"), "v": None}
        sd["v"] = sd["w"][7]
        staging, write = checkpointer.save(str(tmp_path / "c"), sd)
        staging.result(timeout=60)
        expected = sd["w"].cpu()
        sd["w"].zero_()
        write.result(timeout=60)
        loaded = checkpointer.load(str(tmp_path / "c"))
        assert torch.equal(loaded["w"], expected)
        assert torch.equal(loaded["v"], expected[7])
        arena = checkpointer.stager.state_dict_stager.shared_memory
        assert arena is not None
        assert arena.pin
    finally:
        checkpointer.close()


KILLED_TRAINER = """
import sys, time, torch
from torchstow.checkpointing import make_async_checkpointer
checkpointer = make_async_checkpointer()
_, write = checkpointer.save(sys.argv[1], {"w": torch.randn(1000)})
write.result(timeout=120)
held = checkpointer.stager.stage({"x": torch.randn(4096)})  # staged, never sent to the writer
held = held.result() if hasattr(held, "result") else held
print(checkpointer.process.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_trainer_leaks_no_shared_memory(tmp_path: Any) -> None:
    trainer = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINER, str(tmp_path / "c")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None
        writer_pid = int(trainer.stdout.readline())
        prefix = f"torchstow-{trainer.pid}-"
        assert [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]  # the unsent segment
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
        wait_until(
            lambda: not [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)],
            30,
            "the writer process to remove the dead trainer's segments",
        )
        assert writer_pid != trainer.pid
    finally:
        trainer.kill()
        trainer.wait(30)


def test_checkpoint_process_takes_pytorchs_constructor_and_write(tmp_path: Any) -> None:
    log = str(tmp_path / "log.jsonl")
    config = CheckpointProcessConfig(subprocess_init_timeout_secs=60)
    # PyTorch's keywords, with rank_info already among the writer-init arguments (it is not added twice).
    by_keyword = CheckpointProcess(
        rank_info=RankInfo(0, 1),
        config=config,
        subprocess_init_fn=sleeping_init,
        subprocess_init_args=(0.0,),
        checkpoint_writer_init_fn=overwriting_writer,
        checkpoint_writer_init_args={"log": log, "rank_info": RankInfo(0, 1)},
    )
    # PyTorch's positional form, without rank_info (it is added).
    by_position = CheckpointProcess(RankInfo(), config, None, (), overwriting_writer, {"log": log})
    try:
        for process in (by_keyword, by_position):
            assert process.process_creation_future.result(timeout=60) is None
        path = str(tmp_path / "c")
        plain = {"w": torch.arange(10.0), "step": 1}  # not staged: the tensors are copied into the request
        assert by_keyword.write(plain, path, n=1).result(timeout=60) is None
        assert torch.equal(torchstow.read(path)["w"], torch.arange(10.0))
        with DefaultStager(CheckpointStagerConfig(use_shared_memory=True)) as stager:
            staged = stager.stage({"w": torch.ones(10), "step": 2})  # a Future of the staged dict
            assert by_position.write(staged, path, n=2).result(timeout=60) is None
        assert torchstow.read(path)["step"] == 2
        assert [e["kwargs"] for e in LoggingHook(log).entries()] == [{"n": 1}, {"n": 2}]
    finally:
        by_keyword.close()
        by_position.close()
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        CheckpointProcess(RankInfo(), config, checkpoint_writer_init_fn=overwriting_writer, nope=1)
