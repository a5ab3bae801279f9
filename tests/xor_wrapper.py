"""A small byte-level wrapper for the tests, written from docs/plugins.md as a third party
would: ``xor+<inner uri>`` stores data files XORed with a one-byte key (a stand-in for
encryption), manifests plain; and :func:`install`, which registers wrapper backends for
one test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from torchstow.plugins import manager
from torchstow.spi import (
    REQUIRED,
    Backend,
    Buffer,
    ByteStore,
    FileSink,
    ForwardingByteStore,
    Register,
    WrapperBackend,
    hookimpl,
    is_manifest_file,
)

__all__ = ["XorBackend", "XorStore", "install"]


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
        return data if is_manifest_file(name) else bytes(b ^ self.backend.option("key") for b in data)


class XorBackend(WrapperBackend):
    schemes = ("xor",)
    options: ClassVar[dict[str, Any]] = {"key": REQUIRED}
    data_options = frozenset({"key"})

    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        return XorStore(store, self)


def install(monkeypatch: pytest.MonkeyPatch, *backends: type[Backend]) -> None:
    """Make the installed plugins and ``backends`` the registry, for one test."""

    class Plugin:
        @hookimpl
        def torchstow_register_backends(self, register: Register) -> None:
            for backend in backends:
                register(backend)

    pm = manager.get_plugin_manager()
    pm.register(Plugin(), name="test-wrappers")
    monkeypatch.setattr(manager, "_default", manager.BackendRegistry(pm))
