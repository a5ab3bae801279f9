"""AsyncCheckpointer and its writer process: real child processes, real shared memory,
start-up failures and timeouts, graceful and forced termination, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import torchstow
from torchstow import CheckpointException
from torchstow.checkpointing import (
    AsyncCheckpointer,
    BarrierConfig,
    CheckpointerConfig,
    CheckpointProcess,
    CheckpointProcessConfig,
    CheckpointReader,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    DefaultStager,
    RankInfo,
    StateDictStager,
    TCPStoreBarrier,
    WriterHook,
    WriterProcessError,
    WriterProcessTimeoutError,
    make_async_checkpointer,
)
from torchstow.checkpointing.writer_factories import DefaultWriterFactory
from torchstow.checkpointing.writer_messages import Response, WriteRequest, pack_state_dict, unpack_state_dict
from torchstow.checkpointing.writer_process import _write as writer_write
from torchstow.core.futures import failed_future
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


def test_a_rank_whose_staging_failed_fails_the_write_on_every_rank_and_the_next_commits(
    tmp_path: Any,
) -> None:
    """Rank 1's staging fails in the trainer (shared memory full, say): its writer process still
    takes part, as a failed rank, so rank 0 fails that write at once with the same
    CheckpointException, and the ranks' barrier stays in step for the next write (before: no
    request reached rank 1's writer; rank 0 waited out its barrier timeout, and every later write
    timed out, the two barriers a write apart). Rank 0 writes in a thread here, rank 1 in a
    writer process: one spawn, about 2 s."""
    barrier = TCPStoreBarrier(0, 2, tcpstore_port=0, timeout_secs=5)
    rank0 = CheckpointWriter(CheckpointWriterConfig(), RankInfo(0, 2), barrier)
    factory = DefaultWriterFactory(
        CheckpointWriterConfig(write_barrier_timeout_secs=5),
        BarrierConfig("tcp_store", {"tcpstore_port": barrier.store.port}),
    )
    rank1 = CheckpointProcess(RankInfo(1, 2), CheckpointProcessConfig(60, 30), factory)
    try:
        rank1.wait_started(60)
        errors: dict[str, BaseException] = {}

        def write_rank0(name: str) -> None:
            try:
                rank0.write(str(tmp_path / name), {"x0": torch.zeros(2)})
            except Exception as exc:
                errors[name] = exc

        thread = threading.Thread(target=write_rank0, args=("c1",))
        start = time.monotonic()
        thread.start()
        failed = rank1.write(failed_future(OSError(28, "No space left on device")), str(tmp_path / "c1"))
        thread.join(60)
        assert isinstance(errors.get("c1"), CheckpointException), errors  # rank 1's failure, told
        assert time.monotonic() - start < 4  # not rank 0's barrier timeout
        assert "No space left on device" in str(errors["c1"])
        with pytest.raises(CheckpointException) as info:  # the same on rank 1
            failed.result(timeout=60)
        assert isinstance(info.value.failures[1][0], OSError)
        assert not (tmp_path / "c1" / "manifest.json").exists()

        thread = threading.Thread(target=write_rank0, args=("c2",))
        thread.start()
        rank1.write({"x1": torch.ones(2)}, str(tmp_path / "c2")).result(timeout=60)
        thread.join(60)
        assert "c2" not in errors, errors
        loaded = torchstow.read(tmp_path / "c2")
        assert torch.equal(loaded["x0"], torch.zeros(2)) and torch.equal(loaded["x1"], torch.ones(2))
    finally:
        rank1.close()


def test_a_write_request_that_does_not_unpack_fails_every_rank_and_the_next_commits(
    tmp_path: Any,
) -> None:
    """A writer process that cannot unpack its request (a segment gone, say) still takes part in
    the write, as a failed rank: the other rank fails it at once with the same CheckpointException,
    and the next write commits (before: rank 0 waited out its barrier timeout, and the next write
    timed out on both ranks). Both ranks' writer-process loops in threads: under 0.1 s."""
    first = TCPStoreBarrier(0, 2, tcpstore_port=0, timeout_secs=3)
    second = TCPStoreBarrier(1, 2, tcpstore_port=first.store.port, timeout_secs=3)
    writers = [
        CheckpointWriter(CheckpointWriterConfig(), RankInfo(rank, 2), barrier)
        for rank, barrier in enumerate((first, second))
    ]
    segments = SegmentMapper()
    responses: dict[tuple[str, int], Response] = {}

    def run(rank: int, name: str, payload: bytes) -> None:
        request = WriteRequest(1, str(tmp_path / name), payload, {})
        responses[name, rank] = writer_write(writers[rank], segments, request)

    for name, broken in (("c1", b"\x80\x05 not a packed state dict"), ("c2", None)):
        start = time.monotonic()
        threads = [
            threading.Thread(
                target=run,
                args=(
                    rank,
                    name,
                    broken
                    if broken and rank == 1
                    else pack_state_dict({f"x{rank}": torch.ones(2)}, copy_unshared=True),
                ),
            )
            for rank in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        if name == "c1":
            assert time.monotonic() - start < 2.5  # not the barrier's timeout
    segments.close()
    for rank in (0, 1):
        failure = responses["c1", rank].error
        assert failure is not None and isinstance(failure.exc, CheckpointException), failure
        assert "rank 1" in str(failure.exc)
    assert responses["c2", 0].ok and responses["c2", 1].ok, responses
    assert set(torchstow.read(tmp_path / "c2")) == {"x0", "x1"}


class FullShmStager(DefaultStager):
    """A synchronous stager that fails as a full /dev/shm does."""

    def stage(self, state_dict: Any) -> Any:
        raise OSError(28, "No space left on device")


def test_a_staging_that_raises_fails_both_futures_and_still_reaches_the_writer(
    checkpointer: AsyncCheckpointer, tmp_path: Any
) -> None:
    """A synchronous staging that raises does not make ``save`` raise on this rank alone:
    the write still reaches the writer process, failed (on several ranks the others fail
    it with it, instead of waiting for this rank), and the next save works. No spawn."""
    failing = AsyncCheckpointer(
        FullShmStager(CheckpointStagerConfig(use_shared_memory=True, use_async_staging=False)),
        checkpointer.process,
        CheckpointReader(RankInfo()),
    )
    staging, write = failing.save(str(tmp_path / "c"), _state())
    with pytest.raises(OSError, match="No space left"):
        staging.result(timeout=60)
    with pytest.raises(CheckpointException, match="No space left") as info:
        write.result(timeout=60)
    assert isinstance(info.value.failures[0][0], OSError)
    _, ok = checkpointer.save(str(tmp_path / "c"), _state())
    ok.result(timeout=60)
    assert checkpointer.load(str(tmp_path / "c"))["step"] == 1
