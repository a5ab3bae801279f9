"""A wrapper built on ``ForwardingByteStore`` keeps the optional capabilities of the
store it wraps (mapping local files, sharing files between checkpoints, cheap file
sizes) unless it declares ``transforms_bytes = True``, which gets the safe defaults."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout.writer import LayoutWriter
from torchstow.spi import ForwardingByteStore


class Traced(ForwardingByteStore):
    """Keeps the bytes, as a tracing or metering wrapper does (it overrides nothing here)."""


class Masked(ForwardingByteStore):
    """Stores every small file's bytes inverted: what it shows is not what lies on disk."""

    transforms_bytes = True

    def publish(self, name: str, data: bytes) -> None:
        super().publish(name, bytes(b ^ 0xFF for b in data))

    def read_file(self, name: str) -> bytes:
        return bytes(b ^ 0xFF for b in super().read_file(name))

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        super().read_into(name, requests)
        for _, buf in requests:
            buf[:] = bytes(b ^ 0xFF for b in buf)


def _store(path: Path) -> LocalFileStore:
    path.mkdir(exist_ok=True)
    return LocalFileStore(str(path), str(path))


def test_a_wrapper_that_keeps_the_bytes_forwards_every_capability(tmp_path: Path) -> None:
    base = _store(tmp_path / "a")
    base.publish("blob", b"0123456789")
    wrapped = Traced(base)
    assert wrapped.local_path("blob") == base.local_path("blob")
    assert wrapped.file_sizes() == {"blob": 10}
    assert wrapped.can_adopt()
    other = Traced(_store(tmp_path / "b"))
    assert other.adopt(wrapped, "blob")
    assert os.path.samefile(tmp_path / "a" / "blob", tmp_path / "b" / "blob")


def test_a_wrapper_that_transforms_bytes_gets_the_safe_defaults(tmp_path: Path) -> None:
    base = _store(tmp_path / "a")
    masked = Masked(base)
    masked.publish("blob", b"0123456789")
    assert masked.read_file("blob") == b"0123456789"
    assert base.read_file("blob") != b"0123456789"
    assert masked.local_path("blob") is None  # mapping the file would show the stored bytes
    assert masked.file_sizes() is None
    assert not masked.can_adopt()
    other = Masked(_store(tmp_path / "b"))
    assert not other.adopt(masked, "blob")
    assert not (tmp_path / "b" / "blob").exists()


def test_an_incremental_save_through_a_forwarding_wrapper_shares_the_bases_files(tmp_path: Path) -> None:
    state = {"w": torch.arange(1000.0), "b": torch.ones(10)}
    torchstow.save(state, str(tmp_path / "base"), no_dist=True)
    writer = LayoutWriter(Traced(_store(tmp_path / "next")))
    torchstow.save(state, storage_writer=writer, base=str(tmp_path / "base"), no_dist=True)
    shared = [
        name
        for name in os.listdir(tmp_path / "next")
        if (tmp_path / "base" / name).exists()
        and os.path.samefile(tmp_path / "base" / name, tmp_path / "next" / name)
    ]
    assert shared, "the unchanged tensors' data files are hard links to the base's"
    loaded = torchstow.read(str(tmp_path / "next"))
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])


def test_an_incremental_save_through_a_transforming_wrapper_is_refused(tmp_path: Path) -> None:
    torchstow.save({"w": torch.ones(4)}, str(tmp_path / "base"), no_dist=True)
    writer = LayoutWriter(Masked(_store(tmp_path / "next")))
    with pytest.raises(ValueError, match="cannot share files"):
        torchstow.save({"w": torch.ones(4)}, storage_writer=writer, base=str(tmp_path / "base"), no_dist=True)
    assert os.listdir(tmp_path / "next") == []


def test_a_wrapper_reads_in_order_through_its_own_read_into_if_it_has_one(tmp_path: Path) -> None:
    base = _store(tmp_path / "a")
    piece = base.read_segment_bytes
    data = bytes(range(1, 256)) * (2 * piece // 255 + 1)
    Masked(base).publish("masked", data[: 2 * piece])  # stored inverted
    base.publish("plain", data[: 2 * piece])
    for wrapper, name in ((Traced(base), "plain"), (Masked(base), "masked")):
        requests = [(0, memoryview(bytearray(piece))), (piece, memoryview(bytearray(piece)))]
        seen: list[bytes] = []
        wrapper.read_in_order(name, requests, lambda i, r=requests, s=seen: s.append(bytes(r[i][1])))
        assert seen == [data[:piece], data[piece : 2 * piece]], type(wrapper).__name__
