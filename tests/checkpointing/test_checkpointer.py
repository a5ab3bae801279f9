"""CheckpointWriter/Reader, commit hooks, barriers and the sync checkpointer, in one process."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

import torchstow
from torchstow import (
    CheckpointException,
    CheckpointExistsError,
    CheckpointNotFoundError,
    PickleNotAllowedError,
    StateDictMismatchError,
)
from torchstow.checkpointing import (
    Barrier,
    BarrierConfig,
    CheckpointerConfig,
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    DistBarrier,
    RankInfo,
    SyncCheckpointer,
    TCPStoreBarrier,
    WriterHook,
    make_sync_checkpointer,
    register_barrier,
)
from torchstow.checkpointing.barriers import BARRIER_REGISTRY, create_barrier_from_config
from torchstow.checkpointing.opener import StorageOpener
from torchstow.format.files import is_chunk_table


class Recorder(WriterHook, Barrier):
    """A hook and a barrier that log what happened, and whether the rank's manifest existed then."""

    barrier_type = "recorder"

    def __init__(self, uri: str = "", fail_pre_commit: bool = False) -> None:
        self.uri = uri
        self.fail_pre_commit = fail_pre_commit
        self.events: list[tuple[str, Any, bool]] = []

    def _committed(self) -> bool:
        return bool(self.uri) and (torchstow.latest(self.uri.rsplit("/", 1)[0]) == self.uri)

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self.events.append(("pre_commit", (path, kwargs), self._committed()))
        if self.fail_pre_commit:
            raise ValueError("not today")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        self.events.append(("post_commit", (path, kwargs), self._committed()))

    def execute_barrier(self) -> None:
        self.events.append(("barrier", None, self._committed()))


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4, dtype=torch.float16)},
        "optim": {"step": 5, "groups": [{"lr": 0.1}]},
        "names": ("a", "b"),
    }


def test_writer_commits_one_checkpoint_at_path_between_its_hooks(tmp_path: Any) -> None:
    # One checkpoint at `path` itself (not `<path>/rank-<r>`, the old layout, which no torchstow
    # reader found). The seed's contract for a world of one: exactly one barrier per write,
    # pre_commit before it, the commit after it, then post_commit.
    path = str(tmp_path / "step-5")
    recorder = Recorder(path)
    writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo(), barrier=recorder, commit_hook=recorder)
    sd = _state()
    writer.write(path, sd, step=5, tag="best")
    kwargs = {"step": 5, "tag": "best"}
    assert recorder.events == [
        ("pre_commit", (path, kwargs), False),  # this rank's data is written
        ("barrier", None, False),  # the one barrier, before the commit
        ("post_commit", (path, kwargs), True),
    ]
    loaded = torchstow.read(path)  # an ordinary torchstow checkpoint
    assert torch.equal(loaded["model"]["w"], sd["model"]["w"])
    assert loaded["optim"] == {"step": 5, "groups": [{"lr": 0.1}]}
    assert torchstow.info(path).num_entries == 5
    assert not [name for name in os.listdir(path) if name.startswith(".")]  # no exchange files left
    writer.write(str(tmp_path / "step-6"), sd)
    assert [e[0] for e in recorder.events].count("barrier") == 2  # one per write
    assert torchstow.latest(str(tmp_path)) == str(tmp_path / "step-6")


def test_writer_works_without_barrier_or_hook(tmp_path: Any) -> None:
    writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo())
    writer.write(str(tmp_path / "c"), _state())
    assert torch.equal(torchstow.read(tmp_path / "c")["model"]["b"], torch.ones(4, dtype=torch.float16))
    writer.close()


def test_several_ranks_need_a_barrier() -> None:
    with pytest.raises(ValueError, match="of 2 ranks needs a barrier"):
        CheckpointWriter(CheckpointWriterConfig(), RankInfo(0, 2))


def test_a_failing_pre_commit_commits_nothing(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    recorder = Recorder(path, fail_pre_commit=True)
    writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo(), barrier=recorder, commit_hook=recorder)
    with pytest.raises(CheckpointException) as info:
        writer.write(path, _state())
    assert isinstance(info.value.failures[0][0], ValueError)
    # The write's one barrier still runs; no post_commit.
    assert [e[0] for e in recorder.events] == ["pre_commit", "barrier"]
    assert not (tmp_path / "c" / "manifest.json").exists()
    assert os.listdir(path) == []  # this rank's data files are removed too


def test_writing_twice_needs_overwrite(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    CheckpointWriter(CheckpointWriterConfig(), RankInfo()).write(path, {"x": torch.zeros(2)})
    with pytest.raises(CheckpointExistsError):
        CheckpointWriter(CheckpointWriterConfig(), RankInfo()).write(path, {"x": torch.ones(2)})
    CheckpointWriter(CheckpointWriterConfig(overwrite=True), RankInfo()).write(path, {"x": torch.ones(2)})
    assert torch.equal(CheckpointReader(RankInfo()).read(path)[0]["x"], torch.ones(2))


@pytest.fixture
def written(tmp_path: Any) -> str:
    path = str(tmp_path / "ckpt")
    sd = _state()
    sd["model"]["w"] += 100
    CheckpointWriter(CheckpointWriterConfig(), RankInfo()).write(path, sd)
    return path


def test_reader_reads_the_whole_checkpoint(written: str) -> None:
    for rank in (0, 1):  # every rank reads the one checkpoint
        loaded, missing = CheckpointReader(RankInfo(rank, 2)).read(written)
        assert missing == []
        assert torch.equal(loaded["model"]["w"], torch.arange(12.0).reshape(3, 4) + 100)
        assert loaded["model"]["b"].dtype == torch.float16
        assert loaded["optim"] == {"step": 5, "groups": [{"lr": 0.1}]}
        assert loaded["names"] == ("a", "b")


def test_reader_map_location(written: str) -> None:
    reader = CheckpointReader(RankInfo())
    for location in ("cpu", torch.device("cpu"), {"cpu": "cpu"}):
        loaded, _ = reader.read(written, map_location=location)
        assert loaded["model"]["w"].device.type == "cpu"
    with pytest.raises(TypeError, match="map_location"):
        reader.read(written, map_location=3.5)  # type: ignore[arg-type]


def test_reader_partial_read_in_place(written: str) -> None:
    w = torch.zeros(3, 4)
    target = {"model": {"w": w, "b": None}, "optim": {"step": -1}, "extra": torch.zeros(2)}
    loaded, missing = CheckpointReader(RankInfo(1, 2)).read(written, target)
    assert loaded is target
    assert loaded["model"]["w"] is w  # filled in place
    assert torch.equal(w, torch.arange(12.0).reshape(3, 4) + 100)
    assert torch.equal(loaded["model"]["b"], torch.ones(4, dtype=torch.float16))  # None -> a new tensor
    assert loaded["optim"] == {"step": 5}  # only the keys asked for
    assert "names" not in loaded
    assert missing == ["extra"]
    assert torch.equal(target["extra"], torch.zeros(2))


def test_reader_strict_raises_on_missing_keys(written: str) -> None:
    target = {"model": {"w": torch.zeros(3, 4)}, "extra": torch.zeros(2), "more": 1}
    listed = r"(?s)2 key\(s\).*missing from the checkpoint: extra\n  missing from the checkpoint: more"
    with pytest.raises(StateDictMismatchError, match=listed) as info:
        CheckpointReader(RankInfo()).read(written, target, strict=True)
    assert info.value.missing_keys == ["extra", "more"]
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(3, 4, dtype=torch.float64), "dtype float32 in the checkpoint, float64"),
        (torch.zeros(4, 3), r"shape \[3, 4\] in the checkpoint, \[4, 3\]"),
        ("text", "holds a tensor"),
    ],
)
def test_reader_mismatch_is_a_clear_error(written: str, value: Any, message: str) -> None:
    target = {"model": {"w": value}}
    with pytest.raises(StateDictMismatchError, match=message) as info:
        CheckpointReader(RankInfo()).read(written, target)
    assert "model.w" in str(info.value)


def test_reader_missing_checkpoint(tmp_path: Any) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"rank 5 found no checkpoint at .*nothing") as info:
        CheckpointReader(RankInfo(5, 6)).read(str(tmp_path / "nothing"))
    assert isinstance(info.value, FileNotFoundError)


def test_sync_checkpointer_round_trip(tmp_path: Any) -> None:
    recorder = Recorder()
    checkpointer = make_sync_checkpointer(commit_hook=recorder)
    assert isinstance(checkpointer, SyncCheckpointer)
    sd = _state()
    assert checkpointer.save(str(tmp_path / "c"), sd, epoch=2) is None
    assert [(e[0], e[1][1]) for e in recorder.events] == [
        ("pre_commit", {"epoch": 2}),
        ("post_commit", {"epoch": 2}),
    ]
    loaded = checkpointer.load(str(tmp_path / "c"))
    assert torch.equal(loaded["model"]["w"], sd["model"]["w"])
    target = {"model": {"w": torch.zeros(3, 4)}, "gone": torch.zeros(1)}
    assert checkpointer.load(str(tmp_path / "c"), target)["model"]["w"] is target["model"]["w"]
    with pytest.raises(StateDictMismatchError, match="gone"):
        checkpointer.load(str(tmp_path / "c"), target, strict=True)
    checkpointer.close()


def test_tcpstore_barrier_waits_for_every_rank_and_times_out() -> None:
    first = TCPStoreBarrier(0, 2, tcpstore_port=0, timeout_secs=5)
    second = TCPStoreBarrier(1, 2, tcpstore_port=first.store.port, timeout_secs=5)
    passed: list[float] = []

    def late() -> None:
        time.sleep(0.3)
        second.execute_barrier()

    for _ in range(2):  # a barrier object is reused, call after call
        thread = threading.Thread(target=late)
        start = time.monotonic()
        thread.start()
        first.execute_barrier()
        passed.append(time.monotonic() - start)
        thread.join()
    assert min(passed) >= 0.25
    lonely = TCPStoreBarrier(0, 2, store=first.store, barrier_prefix="lonely", timeout_secs=0.5)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of 2 ranks arrived"):
        lonely.execute_barrier()
    assert time.monotonic() - start < 5


def test_a_fresh_tcpstore_barrier_on_a_used_store_still_waits_for_every_rank() -> None:
    """Writers made afresh (or a restarted job) on a store that outlived the old ones: the
    old barriers' last round stays in the store under the same name. Before, a rank of a
    new barrier reaching that round passed it at once, alone."""
    store = dist.HashStore()

    def one_write(barrier: TCPStoreBarrier) -> None:
        barrier.start_write()
        barrier.execute_barrier()

    for _ in range(2):  # old barriers, then fresh ones on the same store: both ranks pass
        pair = [TCPStoreBarrier(rank, 2, store=store, timeout_secs=5) for rank in (0, 1)]
        thread = threading.Thread(target=one_write, args=(pair[1],))
        thread.start()
        one_write(pair[0])
        thread.join(timeout=5)
        assert not thread.is_alive()
    alone = TCPStoreBarrier(0, 2, store=store, timeout_secs=0.3)
    with pytest.raises(TimeoutError, match="1 of 2 ranks arrived"):
        one_write(alone)


def test_barrier_config_registry() -> None:
    assert create_barrier_from_config(BarrierConfig()) is None
    assert set(BARRIER_REGISTRY) >= {"dist_barrier", "tcp_store"}
    barrier = create_barrier_from_config(
        BarrierConfig("tcp_store", {"tcpstore_port": 0}), RankInfo(0, 1), timeout_secs=7
    )
    assert isinstance(barrier, TCPStoreBarrier)
    assert (barrier.rank, barrier.world_size, barrier.timeout_secs) == (0, 1, 7)
    barrier.execute_barrier()  # a world of one passes at once
    with pytest.raises(ValueError, match=r"unknown barrier type 'nope'; registered types: .*tcp_store"):
        create_barrier_from_config(BarrierConfig("nope"))


class CountingBarrier(Barrier):
    barrier_type = "counting"
    calls: ClassVar[list[str]] = []

    def __init__(self, label: str) -> None:
        self.label = label

    def execute_barrier(self) -> None:
        self.calls.append(self.label)


def test_a_registered_barrier_is_used_by_the_builder(tmp_path: Any) -> None:
    register_barrier(CountingBarrier)
    try:
        config = CheckpointerConfig(barrier_config=BarrierConfig("counting", {"label": "mine"}))
        checkpointer = make_sync_checkpointer(config)
        checkpointer.save(str(tmp_path / "c"), {"x": torch.ones(1)})
        checkpointer.save(str(tmp_path / "d"), {"x": torch.ones(1)})
        assert CountingBarrier.calls == ["mine"] * 2  # one round per write in a world of one
    finally:
        del BARRIER_REGISTRY["counting"]


def test_dist_barrier_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="TCPStoreBarrier"):
        DistBarrier()


def test_register_barrier_needs_a_type_name() -> None:
    class Nameless(Barrier):
        def execute_barrier(self) -> None:
            pass

    with pytest.raises(TypeError, match="barrier_type"):
        register_barrier(Nameless)


def _nested_state() -> dict[str, Any]:
    return {
        "model": {"enc": {"w": torch.ones(2, 2), "b": torch.zeros(2)}, "head": torch.arange(3.0)},
        "optim": {"state": {0: {"exp_avg": torch.full((2,), 0.5)}}, "param_groups": [{"lr": 0.1}]},
        "buffers": [torch.ones(1), torch.zeros(1)],
        "step": 9,
    }


def test_reader_none_placeholders_read_whole_subtrees_at_any_depth(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    CheckpointWriter(CheckpointWriterConfig(), RankInfo()).write(path, _nested_state())
    head = torch.zeros(3)
    target: dict[str, Any] = {
        "model": {"enc": None, "head": head},  # a sub-dict two levels down
        "optim": None,  # a whole top-level subtree (with its int keys)
        "buffers": None,  # a list
        "step": None,  # a single value
    }
    loaded, missing = CheckpointReader(RankInfo()).read(path, target, map_location="cpu")
    assert missing == []
    assert loaded is target
    assert loaded["model"]["head"] is head and torch.equal(head, torch.arange(3.0))
    assert set(loaded["model"]["enc"]) == {"w", "b"}
    assert torch.equal(loaded["model"]["enc"]["w"], torch.ones(2, 2))
    assert torch.equal(loaded["optim"]["state"][0]["exp_avg"], torch.full((2,), 0.5))
    assert loaded["optim"]["param_groups"] == [{"lr": 0.1}]
    assert isinstance(loaded["buffers"], list) and torch.equal(loaded["buffers"][1], torch.zeros(1))
    assert loaded["step"] == 9


def test_reader_reports_missing_keys_as_pytorch_does(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    CheckpointWriter(CheckpointWriterConfig(), RankInfo()).write(path, _nested_state())
    target = {
        "model": {"enc": {"w": torch.zeros(2, 2), "gone": torch.zeros(1)}, "extra": {"a": torch.zeros(1)}},
        "nothing": None,  # a placeholder for something the checkpoint lacks
        "buffers": [torch.zeros(1), torch.zeros(1), torch.zeros(1)],
    }
    loaded, missing = CheckpointReader(RankInfo()).read(path, target)
    # The shallowest absent path, dict keys dotted, list positions in brackets.
    assert missing == ["model.enc.gone", "model.extra", "nothing", "buffers[2]"]
    assert loaded["nothing"] is None
    assert torch.equal(loaded["model"]["enc"]["w"], torch.ones(2, 2))
    with pytest.raises(StateDictMismatchError, match=r"model\.extra") as info:
        CheckpointReader(RankInfo()).read(path, target, strict=True)
    assert info.value.missing_keys == missing


@dataclass
class Opaque:
    """A value only full pickle restores."""

    n: int


def test_reader_keyword_arguments(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    sd = {"obj": Opaque(3), "x": torch.ones(1)}  # stored with full pickle
    CheckpointWriter(CheckpointWriterConfig(allow_pickle=True), RankInfo()).write(path, sd)
    reader = CheckpointReader(RankInfo())
    with pytest.raises(PickleNotAllowedError, match="allow_pickle"):
        reader.read(path)
    assert reader.read(path, allow_pickle=True)[0]["obj"] == Opaque(3)
    assert reader.read(path, weights_only=False)[0]["obj"] == Opaque(3)  # torch.load's spelling
    assert torch.equal(reader.read(path, {"x": None}, mmap=True, storage_options={})[0]["x"], torch.ones(1))
    # Any other keyword is accepted and passed over, as PyTorch's reader does (torch.load's).
    loaded, missing = reader.read(path, {"x": None}, map_location="cpu", pickle_module=None, nope=1)
    assert torch.equal(loaded["x"], torch.ones(1)) and missing == []
    assert reader.read(path, allow_pickle=True, encoding="utf-8")[0]["obj"] == Opaque(3)


class BrokenOpener(StorageOpener):
    """Storage that cannot be reached from this rank."""

    def writer(self, uri: str, *, overwrite: bool = False) -> Any:
        raise OSError("no route to the storage")


def _two_ranks(tmp_path: Any, openers: tuple[Any, Any], sds: tuple[Any, Any]) -> dict[int, Exception]:
    """Both ranks' writers in threads of this process (a TCPStore client each); their errors."""
    first = TCPStoreBarrier(0, 2, tcpstore_port=0, timeout_secs=30)
    second = TCPStoreBarrier(1, 2, tcpstore_port=first.store.port, timeout_secs=30)
    writers = [
        CheckpointWriter(CheckpointWriterConfig(), RankInfo(rank, 2), barrier, opener=opener)
        for rank, (barrier, opener) in enumerate(zip((first, second), openers))
    ]
    errors: dict[int, Exception] = {}

    def run(rank: int) -> None:
        try:
            writers[rank].write(str(tmp_path / "c"), sds[rank])
        except Exception as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def test_two_ranks_write_one_checkpoint(tmp_path: Any) -> None:
    sds = tuple({"shared": torch.arange(4.0), f"own{r}": torch.full((2,), float(r))} for r in (0, 1))
    assert _two_ranks(tmp_path, (None, None), sds) == {}
    loaded = torchstow.read(tmp_path / "c")
    assert set(loaded) == {"shared", "own0", "own1"}
    assert torch.equal(loaded["own1"], torch.ones(2))
    kept = sorted(
        n for n in os.listdir(tmp_path / "c") if not n.startswith("data-") and not is_chunk_table(n)
    )
    assert kept == ["manifest.json"]


def test_a_rank_that_cannot_open_the_storage_fails_every_rank(tmp_path: Any) -> None:
    sds = ({"x": torch.ones(2)}, {"x": torch.ones(2)})
    errors = _two_ranks(tmp_path, (None, BrokenOpener()), sds)
    assert isinstance(errors[1], OSError)  # its own error
    assert isinstance(errors[0], CheckpointException)  # the other rank is told, not left waiting
    assert "rank 1" in str(errors[0])
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_the_write_after_a_barrier_timeout_commits(tmp_path: Any) -> None:
    """A rank later than the barrier's timeout fails that write, on both ranks, having run a
    different number of rounds than the other; the next write must still find the ranks in
    step (before: their TCPStore rounds stayed one apart, so every later write failed, one
    rank finding no message and the other timing out), also through a new writer sharing
    the barrier. About 0.8 s."""
    first = TCPStoreBarrier(0, 2, tcpstore_port=0, timeout_secs=0.3)
    second = TCPStoreBarrier(1, 2, tcpstore_port=first.store.port, timeout_secs=0.3)
    gave_up = threading.Event()
    errors: dict[tuple[str, int], Exception] = {}

    def run(rank: int, name: str) -> None:
        if name == "c1" and rank == 1:
            gave_up.wait(30)  # comes once rank 0 has timed out at the first round
        barrier = (first, second)[rank]  # shared by each write's own writer
        writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo(rank, 2), barrier)
        try:
            writer.write(str(tmp_path / name), {f"x{rank}": torch.full((2,), float(rank))})
        except Exception as exc:
            errors[name, rank] = exc
        finally:
            gave_up.set()

    for name in ("c1", "c2", "c3"):
        threads = [threading.Thread(target=run, args=(rank, name)) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        first.timeout_secs = second.timeout_secs = 10.0
    assert sorted(errors) == [("c1", 0), ("c1", 1)], errors
    assert all(isinstance(error, TimeoutError) for error in errors.values())
    for name in ("c2", "c3"):
        loaded = torchstow.read(tmp_path / name)
        assert torch.equal(loaded["x0"], torch.zeros(2)) and torch.equal(loaded["x1"], torch.ones(2))


def test_a_write_failing_before_its_data_passes_its_one_barrier(tmp_path: Any) -> None:
    path = str(tmp_path / "c")
    CheckpointWriter(CheckpointWriterConfig(), RankInfo()).write(path, {"x": torch.zeros(2)})
    recorder = Recorder(path)
    writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo(), barrier=recorder, commit_hook=recorder)
    with pytest.raises(CheckpointException, match="CheckpointExistsError"):
        writer.write(path, {"x": torch.ones(2)})
    assert [e[0] for e in recorder.events] == ["barrier"]  # no pre_commit, no post_commit
    assert torch.equal(torchstow.read(path)["x"], torch.zeros(2))


def test_write_failed_raises_the_error_as_the_write_s_failure_and_passes_its_barrier(tmp_path: Any) -> None:
    """A rank whose state dict never reached its writer still runs the write, failed: the
    CheckpointException names its error, no hook runs, its one barrier is passed, and the
    writer's next write commits."""
    path = str(tmp_path / "c")
    recorder = Recorder(path)
    writer = CheckpointWriter(CheckpointWriterConfig(), RankInfo(), barrier=recorder, commit_hook=recorder)
    with pytest.raises(CheckpointException, match="No space left") as info:
        writer.write_failed(path, OSError(28, "No space left on device"))
    assert isinstance(info.value.failures[0][0], OSError)
    assert [e[0] for e in recorder.events] == ["barrier"]
    assert not (tmp_path / "c" / "manifest.json").exists()
    writer.write(path, {"x": torch.ones(2)})
    assert torch.equal(torchstow.read(path)["x"], torch.ones(2))
