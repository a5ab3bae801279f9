"""``count+<inner-uri>``: a byte-level wrapper that counts the bytes read through it.

For tests and benchmarks that prove where a load's bytes came from (a tiered
restore that must read nothing from its root): open the root as
``count+file:///...`` (or ``count+s3://...``) after :func:`install_counting`,
and :func:`bytes_read` tells what this process read through every ``count+``
store since (:func:`read_calls`: in how many reads). Bytes pass unchanged; a store
never hands out a local path to map, so every read goes through :meth:`CountingStore.read_into`,
:meth:`CountingStore.read_file` or :meth:`CountingStore.read_small_file`, where it is counted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from torchstow.plugins import manager
from torchstow.spi import ByteStore, ForwardingByteStore, Register, WrapperBackend, hookimpl

__all__ = ["CountingBackend", "CountingStore", "bytes_read", "install_counting", "read_calls"]

_lock = threading.Lock()
_read = 0
_calls = 0


def _add(nbytes: int) -> None:
    global _read, _calls
    with _lock:
        _read += nbytes
        _calls += 1


def bytes_read() -> int:
    """The bytes read through ``count+`` stores in this process so far (data and manifests)."""
    with _lock:
        return _read


def read_calls() -> int:
    """The ``read_into``, ``read_file`` and ``read_small_file`` calls made on ``count+`` stores in
    this process so far."""
    with _lock:
        return _calls


class CountingStore(ForwardingByteStore):
    """The inner store, counting every byte read from it: into this process's count
    (:func:`bytes_read`), and the data bytes (read with ``read_into``, manifests
    left out) into this store's own ``data_bytes``."""

    def __init__(self, inner: ByteStore) -> None:
        super().__init__(inner)
        self.data_bytes = 0

    def local_path(self, name: str) -> str | None:
        return None  # a mapped file would be read past the count

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        self.inner.read_into(name, requests)
        nbytes = sum(buffer.nbytes for _, buffer in requests)
        _add(nbytes)
        with _lock:
            self.data_bytes += nbytes

    def read_file(self, name: str) -> bytes:
        data = self.inner.read_file(name)
        _add(len(data))
        return data

    def read_small_file(self, name: str, limit: int) -> bytes | None:
        """The inner store's bounded read (its one request), counted as :meth:`read_file` is."""
        data = self.inner.read_small_file(name, limit)
        _add(len(data or b""))
        return data


class CountingBackend(WrapperBackend):
    """``count+<inner-uri>``: the inner backend's stores, counting what is read."""

    schemes = ("count",)

    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        return CountingStore(store)


class _Plugin:
    @hookimpl
    def torchstow_register_backends(self, register: Register) -> None:
        register(CountingBackend)


def install_counting() -> None:
    """Register ``count+`` in this process's backend registry, beside the installed plugins."""
    with _lock:
        registry = manager.default_registry()
        if "count" in registry.entries:
            return
        pm = manager.get_plugin_manager()
        pm.register(_Plugin(), name="torchstow-testing-count")
        manager._default = manager.BackendRegistry(pm)
