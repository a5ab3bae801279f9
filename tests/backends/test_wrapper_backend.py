"""A byte-level wrapper built on ``WrapperBackend`` (as docs/plugins.md shows): it inherits
the inner backend's tuning, its own options are namespaced ``<scheme>.<name>``, and an
option it needs only for data is not demanded by what reads only manifests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import torchstow
from torchstow.backends.fsspec.store import THREADS
from torchstow.cli import main
from torchstow.core.layout.location import default_thread_count
from torchstow.errors import CheckpointException
from torchstow.plugins import manager
from torchstow.plugins.resolve import route_options
from torchstow.spi import (
    MANIFEST,
    REQUIRED,
    Buffer,
    ByteStore,
    FileSink,
    ForwardingByteStore,
    Register,
    WrapperBackend,
    hookimpl,
)

from storage_helpers import s3_options, unique


class _XorSink(FileSink):
    def __init__(self, inner: FileSink, key: int) -> None:
        self.inner, self.key = inner, key
        self.keeps_buffers = False

    def write(self, buffers: Sequence[Buffer]) -> None:
        self.inner.write([np.frombuffer(buf, dtype=np.uint8) ^ self.key for buf in buffers])

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class XorStore(ForwardingByteStore):
    """Data files XORed with a one-byte key (a stand-in for encryption); manifests plain."""

    transforms_bytes = True

    def __init__(self, inner: ByteStore, backend: XorBackend) -> None:
        super().__init__(inner)
        self.backend = backend

    def create(self, name: str) -> FileSink:
        return _XorSink(self.inner.create(name), self.backend.option("key"))

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        key = self.backend.option("key")
        self.inner.read_into(name, requests)
        for _, buf in requests:
            np.frombuffer(buf, dtype=np.uint8)[:] ^= key

    def read_file(self, name: str) -> bytes:
        data = self.inner.read_file(name)
        return data if name == MANIFEST else bytes(b ^ self.backend.option("key") for b in data)


class XorBackend(WrapperBackend):
    schemes = ("xor",)
    options: ClassVar[dict[str, Any]] = {"key": REQUIRED}
    data_options = frozenset({"key"})

    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        return XorStore(store, self)


class _Plugin:
    @hookimpl
    def torchstow_register_backends(self, register: Register) -> None:
        register(XorBackend)


@pytest.fixture(autouse=True)
def xor_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = manager.get_plugin_manager()
    pm.register(_Plugin(), name="xor")
    monkeypatch.setattr(manager, "_default", manager.BackendRegistry(pm))


@pytest.fixture
def s3(s3_endpoint: str, s3_bucket: str) -> tuple[str, dict[str, Any]]:
    return f"s3://{s3_bucket}/{unique('wrap')}", s3_options(s3_endpoint)


def _writer_threads(uri: str, options: dict[str, Any]) -> int:
    return torchstow.api.storage_writer(uri, storage_options=options).thread_count  # type: ignore[attr-defined,no-any-return]


def test_a_wrapper_uses_the_inner_backends_thread_count(
    tmp_path: Path, s3: tuple[str, dict[str, Any]]
) -> None:
    root, options = s3
    xor = {"xor.key": 7}
    assert _writer_threads(f"xor+{root}/c", {**options, **xor}) == THREADS != default_thread_count()
    assert _writer_threads(f"xor+file://{tmp_path}/c", xor) == default_thread_count()
    assert _writer_threads(f"xor+file://{tmp_path}/c", {**xor, "thread_count": 3}) == 3
    reader = torchstow.api.storage_reader(  # type: ignore[attr-defined]
        f"xor+{root}/c", storage_options={**options, **xor, "verify_checksums": False}
    )
    assert (reader.thread_count, reader.verify_checksums) == (THREADS, False)


def test_wrapper_options_never_collide_with_the_inner_ones(s3: tuple[str, dict[str, Any]]) -> None:
    root, options = s3  # s3fs's own option "key" (the access key id) is among these
    uri = f"xor+{root}/c"
    torchstow.save({"w": torch.arange(8)}, uri, storage_options={**options, "xor.key": 0x5A})
    loaded = torchstow.read(uri, storage_options={**options, "xor.key": 0x5A})
    assert torch.equal(loaded["w"], torch.arange(8))
    with pytest.raises(TypeError, match=r"\['xor.kye'\].*endpoint_url.*part_size.*xor\.key"):
        torchstow.read(uri, storage_options={**options, "xor.kye": 1})
    # cp's -o routing: the S3 credentials go to both sides, the wrapper's key to its side only
    src, dst = route_options(uri, f"{root}/plain", {**options, "xor.key": 1})
    assert src == {**options, "xor.key": 1} and dst == options


def test_a_data_only_option_is_not_demanded_by_manifest_verbs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"xor+file://{tmp_path}/run/step-1"
    torchstow.save({"w": torch.arange(8)}, uri, storage_options={"xor.key": 0x5A})
    assert torchstow.info(uri).nbytes == 64
    assert [c.uri for c in torchstow.list_checkpoints(f"xor+file://{tmp_path}/run")] == [uri]
    assert main(["ls", f"xor+file://{tmp_path}/run"]) == 0 and main(["info", uri]) == 0
    with pytest.raises(CheckpointException, match=r"needs the storage option xor\.key to read or write data"):
        torchstow.read(uri)
    with pytest.raises(TypeError, match=r"needs the storage option xor\.key to read or write data"):
        torchstow.save({}, f"xor+file://{tmp_path}/run/step-2")
    capsys.readouterr()
    assert main(["verify", uri]) != 0 and "-o xor.key=VALUE" in capsys.readouterr().err
    assert main(["verify", uri, "-o", "xor.key=90"]) == 0


def test_faulty_takes_its_parameters_as_namespaced_options(
    tmp_path: Path, s3: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, options = s3
    uri = f"faulty+{root}/c"
    with pytest.raises(CheckpointException, match="injected fault in finish"):
        torchstow.save({"w": torch.ones(2)}, uri, storage_options={**options, "faulty.fail": "finish"})
    with pytest.raises(TypeError, match=r"\['faulty.fial'\].*faulty\.fail"):
        torchstow.save({"w": torch.ones(2)}, uri, storage_options={**options, "faulty.fial": "finish"})
    with pytest.raises(TypeError, match=r"\['endpoint'\].*endpoint_url.*faulty\.fail"):
        torchstow.save({"w": torch.ones(2)}, uri, storage_options={"endpoint": "x"})
    # cp's -o: s3fs's "key" reaches the wrapped S3 side too, the fault only the faulty side
    torchstow.save({"w": torch.ones(2)}, f"{root}/src", storage_options=options)
    flags = [arg for name, value in options.items() for arg in ("-o", f"{name}={value}")]
    assert main(["cp", f"{root}/src", uri, *flags, "-o", "faulty.fail=finish"]) != 0
    assert "injected fault in finish" in capsys.readouterr().err
    assert main(["cp", f"{root}/src", uri, *flags]) == 0
    assert torch.equal(torchstow.read(uri, storage_options=options)["w"], torch.ones(2))
