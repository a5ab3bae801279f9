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
    original = LocalFileStore.read_into

    def spy(self: LocalFileStore, name: str, requests: Any) -> None:
        seen.extend(address(buf) for _, buf in requests)
        original(self, name, requests)

    monkeypatch.setattr(LocalFileStore, "read_into", spy)
    torchstow.load(targets, ckpt)
    big = targets["big"]
    assert targets["small"].data_ptr() in seen
    assert all(
        big.data_ptr() <= a < big.data_ptr() + big.nbytes for a in seen if a != targets["small"].data_ptr()
    )
