"""The layout reader's threads: kept from load to load (and started afresh in a forked
child), at most a bounded number of them, and a failed read stops the others before the
load raises."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout import reader as reader_module
from torchstow.core.layout.reader import LayoutReader
from torchstow.core.storage.forwarding import ForwardingByteStore
from torchstow.testing._fork import can_fork, run_forked

PATIENCE = 10.0  # seconds a read waits for the other reader thread


def _state(value: float | None) -> dict[str, torch.Tensor]:
    """Four 4 MiB tensors: saved with 2 threads, two files, a read job each. Made (and
    compared) with NumPy: torch's parallel kernels may hang in a forked child."""
    return {
        f"t{i}": torch.from_numpy(np.full(1 << 20, 0.0 if value is None else value + i, dtype=np.float32))
        for i in range(4)
    }


class MeetingStore(ForwardingByteStore):
    """Each read waits until reads have begun on ``threads`` threads at once (the names of
    the threads that read are kept)."""

    def __init__(self, inner: LocalFileStore, threads: int = 2) -> None:
        super().__init__(inner)
        self.threads = threads
        self.readers: list[str] = []
        self.lock = threading.Lock()
        self.met = threading.Event()

    def read_in_order(
        self, name: str, requests: Sequence[tuple[int, memoryview]], landed: Callable[[int], None]
    ) -> None:
        with self.lock:
            self.readers.append(threading.current_thread().name)
            if len(set(self.readers)) >= self.threads:
                self.met.set()
        if not self.met.wait(PATIENCE):
            raise TimeoutError(f"fewer than {self.threads} threads read at once")
        super().read_in_order(name, requests, landed)


def _load_meeting(path: str) -> MeetingStore:
    store = MeetingStore(LocalFileStore(path, path))
    target = _state(None)
    torchstow.load(target, storage_reader=LayoutReader(store, thread_count=2))
    for key, value in _state(1.0).items():
        assert np.array_equal(target[key].numpy(), value.numpy()), key
    return store


@pytest.fixture
def ckpt(tmp_path: Any) -> str:
    path = str(tmp_path / "ckpt")
    torchstow.save(_state(1.0), path, storage_options={"thread_count": 2})
    return path


def test_a_load_reads_on_two_threads_and_starts_none_once_they_exist(
    ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load_meeting(ckpt)
    started: list[str] = []
    start = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counting)
    store = _load_meeting(ckpt)
    assert len(set(store.readers)) == 2
    assert started == []


@pytest.mark.skipif(not can_fork(), reason="needs os.fork")
def test_a_child_forked_after_a_load_reads_on_two_threads(ckpt: str) -> None:
    _load_meeting(ckpt)  # the parent's reader threads exist; a child has none of them
    readers = run_forked(lambda: _load_meeting(ckpt).readers, timeout=60)
    assert len(set(readers)) == 2


def test_a_load_on_more_threads_than_are_kept_reads_on_all_and_keeps_no_more(tmp_path: Any) -> None:
    kept = reader_module._KEPT_READERS
    threads = kept + 2
    path = str(tmp_path / "ckpt")
    state = {f"t{i}": torch.from_numpy(np.full(1 << 18, float(i), dtype=np.float32)) for i in range(threads)}
    torchstow.save(state, path, storage_options={"thread_count": 1})  # 1 MiB items: a read job each
    store = MeetingStore(LocalFileStore(path, path), threads)
    target = {key: torch.from_numpy(np.zeros(1 << 18, dtype=np.float32)) for key in state}
    torchstow.load(target, storage_reader=LayoutReader(store, thread_count=threads))
    assert len(set(store.readers)) == threads
    for key, value in state.items():
        assert np.array_equal(target[key].numpy(), value.numpy()), key
    for thread in threading.enumerate():
        if thread.name.startswith("torchstow-read-extra"):
            thread.join(PATIENCE)  # the ones started for the load end with it
    alive = [t for t in threading.enumerate() if t.name.startswith("torchstow-read")]
    assert len(alive) <= kept


class FailingStore(ForwardingByteStore):
    """Once two threads read, the first read fails; the other one goes on for a while
    after that and notes when it ended. Reads begun later are noted too."""

    def __init__(self, inner: LocalFileStore) -> None:
        super().__init__(inner)
        self.calls = 0
        self.lock = threading.Lock()
        self.met = threading.Event()
        self.failed = threading.Event()
        self.other_ended = threading.Event()
        self.late: list[str] = []

    def read_in_order(
        self, name: str, requests: Sequence[tuple[int, memoryview]], landed: Callable[[int], None]
    ) -> None:
        with self.lock:
            self.calls += 1
            call = self.calls
            if call == 2:
                self.met.set()
        if call > 2:
            self.late.append(name)
        elif not self.met.wait(PATIENCE):
            raise TimeoutError("no second thread read beside this one")
        elif call == 1:
            self.failed.set()
            raise OSError("injected read failure")
        else:
            self.failed.wait(PATIENCE)
            time.sleep(0.2)
            super().read_in_order(name, requests, landed)
            self.other_ended.set()


def test_a_failed_read_stops_the_reads_after_it_and_waits_for_the_others(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    torchstow.save(_state(1.0), path, storage_options={"thread_count": 4})  # four read jobs
    store = FailingStore(LocalFileStore(path, path))
    with pytest.raises(Exception, match="injected read failure"):
        torchstow.load(_state(None), storage_reader=LayoutReader(store, thread_count=2))
    assert store.other_ended.is_set()  # no thread still writes into the targets
    assert store.late == []
