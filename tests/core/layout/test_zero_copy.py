"""Bytes move once: from tensor memory to the file, from the file into the target."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else -1


def test_save_writes_straight_from_tensor_memory(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.randn(1 << 20)
    small = torch.arange(16.0)
    seen: list[int] = []
    original = LocalFileStore.create

    def create(self: LocalFileStore, name: str) -> Any:
        sink = original(self, name)
        write = sink.write

        def spy(buffers: Any) -> None:
            seen.extend(address(memoryview(b)) for b in buffers if len(b) and isinstance(b, memoryview))
            write(buffers)

        sink.write = spy  # type: ignore[method-assign]
        return sink

    monkeypatch.setattr(LocalFileStore, "create", create)
    torchstow.save({"big": big, "small": small}, ckpt)
    start, end = big.data_ptr(), big.data_ptr() + big.nbytes
    assert any(start <= a < end for a in seen), "big was not written from its own memory"
    assert small.data_ptr() in seen


def test_load_reads_straight_into_the_target(ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torchstow.save({"big": torch.randn(1 << 20), "small": torch.arange(16.0)}, ckpt)
    targets = {"big": torch.zeros(1 << 20), "small": torch.zeros(16)}
    seen: list[int] = []
    original = LocalFileStore.read_in_order

    def spy(self: LocalFileStore, name: str, requests: Any, landed: Any) -> None:
        seen.extend(address(buf) for _, buf in requests)
        original(self, name, requests, landed)

    monkeypatch.setattr(LocalFileStore, "read_in_order", spy)
    torchstow.load(targets, ckpt)
    big = targets["big"]
    assert targets["small"].data_ptr() in seen
    assert all(
        big.data_ptr() <= a < big.data_ptr() + big.nbytes for a in seen if a != targets["small"].data_ptr()
    )


def test_a_local_read_hands_each_piece_over_before_reading_the_next(tmp_path: Any) -> None:
    """What verifying in cache relies on: piece i is checked before piece i + 1 is read."""
    store = LocalFileStore(str(tmp_path), str(tmp_path))
    piece = store.read_segment_bytes
    data = torch.randint(1, 256, (4 * piece,), dtype=torch.uint8).numpy().tobytes()  # no zero byte
    store.publish("data", data)
    requests = [(i * piece, memoryview(bytearray(piece))) for i in range(4)]
    order: list[int] = []

    def landed(i: int) -> None:
        assert bytes(requests[i][1]) == data[i * piece : (i + 1) * piece]
        if i + 1 < len(requests):
            assert not any(requests[i + 1][1]), f"piece {i + 1} was read before piece {i} was handed over"
        order.append(i)

    store.read_in_order("data", requests, landed)
    assert order == [0, 1, 2, 3]
