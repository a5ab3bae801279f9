"""The byte-store conformance kit: the :class:`~torchstow.spi.ByteStore` contract, called directly.

The layout writer and reader rely on these rules; a store that breaks one
shows up here with a one-line reason instead of as a puzzling failed load.
Subclass :class:`ByteStoreConformance` and set ``scheme``; the stores come
from your :class:`~torchstow.spi.StoreBackend` (override ``store_backend`` or
``open_store`` to build them another way).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest

from torchstow.spi import MANIFEST, ByteStore, CorruptCheckpointError, StoreBackend, open_backend
from torchstow.testing.base import ConformanceBase

__all__ = ["ByteStoreConformance"]


def _pattern(nbytes: int, seed: int) -> bytes:
    """``nbytes`` random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(nbytes)


def _write(store: ByteStore, name: str, pieces: Sequence[bytes | bytearray]) -> None:
    sink = store.create(name)
    sink.write([memoryview(p) for p in pieces])
    sink.close()


class ByteStoreConformance(ConformanceBase):
    """Contract tests for the byte store of a torchstow backend; subclass and set ``scheme``."""

    threads: ClassVar[int] = 8  # writers that share one store instance in the concurrency test

    # -- fixtures a backend overrides ------------------------------------------------

    @pytest.fixture
    def store_backend(self, root_uri: str, storage_options: dict[str, Any]) -> StoreBackend:
        """The backend under test, built with ``storage_options``."""
        backend = open_backend(root_uri, storage_options)
        if not isinstance(backend, StoreBackend):
            pytest.fail(f"{type(backend).__name__} is not a StoreBackend: override store_backend")
        return backend

    @pytest.fixture
    def open_store(self, store_backend: StoreBackend) -> Callable[[str], ByteStore]:
        """A store for the location at a URI (a new instance per call)."""
        return store_backend.open_store

    @pytest.fixture
    def store(self, root_uri: str, open_store: Callable[[str], ByteStore]) -> ByteStore:
        """A prepared store at a fresh location under ``root_uri``."""
        store = open_store(self.uri(root_uri, "ckpt"))
        store.prepare()
        return store

    # -- the tests -----------------------------------------------------------------

    def test_write_then_read(self, store: ByteStore) -> None:
        pieces: list[bytes | bytearray] = [
            _pattern(1000, 1),
            b"",
            _pattern(70_000, 2),
            bytearray(_pattern(5, 3)),
        ]
        _write(store, "data-0", pieces)
        _write(store, "empty", [])
        whole = b"".join(pieces)
        assert store.read_file("data-0") == whole
        assert store.read_file("empty") == b""
        requests = [(60_000, 4096), (0, 10), (len(whole) - 7, 7), (999, 2)]
        buffers = [(offset, memoryview(bytearray(n))) for offset, n in requests]
        store.read_into("data-0", buffers)
        for offset, buf in buffers:
            assert bytes(buf) == whole[offset : offset + len(buf)], f"read_into at offset {offset}"
        assert sorted(store.list_files()) == ["data-0", "empty"]

    def test_missing_file_is_file_not_found(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        never_prepared = open_store(self.uri(root_uri, "nothing-here"))
        for where in (store, never_prepared):
            with pytest.raises(FileNotFoundError):
                where.read_file("missing")
            with pytest.raises(FileNotFoundError):
                where.read_into("missing", [(0, memoryview(bytearray(4)))])

    def test_short_read_is_corrupt(self, store: ByteStore) -> None:
        _write(store, "data-0", [_pattern(100, 4)])
        for offset, nbytes in ((90, 20), (100, 1), (500, 8)):  # across the end, at it, past it
            with pytest.raises(CorruptCheckpointError):
                store.read_into("data-0", [(offset, memoryview(bytearray(nbytes)))])

    def test_publish_replaces_atomically(self, store: ByteStore) -> None:
        versions = [_pattern(300_000, 5), _pattern(200_003, 6)]
        store.publish(MANIFEST, versions[0])
        seen: list[bytes] = []
        failures: list[BaseException] = []
        done = threading.Event()

        def read_while_publishing() -> None:
            try:
                while not done.is_set():
                    seen.append(store.read_file(MANIFEST))
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=read_while_publishing)
        reader.start()
        try:
            for i in range(20):
                store.publish(MANIFEST, versions[i % 2])
        finally:
            done.set()
            reader.join()
        assert not failures, f"reading during publish failed: {failures[0]!r}"
        torn = [len(data) for data in seen if data not in versions]
        assert not torn, f"{len(torn)} reads saw a partly published file (sizes {torn[:5]})"
        assert store.read_file(MANIFEST) == versions[1]
        assert store.list_files() == [MANIFEST], "publish left other files behind"

    def test_concurrent_create(self, store: ByteStore) -> None:
        start = threading.Barrier(self.threads)
        failures: list[BaseException] = []

        def write(i: int) -> None:
            try:
                sink = store.create(f"data-{i}")
                start.wait(timeout=60)
                for part in range(4):
                    sink.write([_pattern(50_000, i * 10 + part)])
                sink.close()
            except BaseException as exc:
                failures.append(exc)

        workers = [threading.Thread(target=write, args=(i,)) for i in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not failures, f"a writer thread failed: {failures[0]!r}"
        assert sorted(store.list_files()) == sorted(f"data-{i}" for i in range(self.threads))
        for i in range(self.threads):
            expected = b"".join(_pattern(50_000, i * 10 + part) for part in range(4))
            assert store.read_file(f"data-{i}") == expected, f"data-{i} holds another writer's bytes"

    def test_list_and_delete(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        assert open_store(self.uri(root_uri, "nothing-here")).list_files() == []
        assert store.list_files() == []
        for name in ("data-0", "data-1", "data-2"):
            _write(store, name, [name.encode()])
        store.publish(MANIFEST, b"{}")
        assert sorted(store.list_files()) == sorted([MANIFEST, "data-0", "data-1", "data-2"])
        store.delete_files(["data-1", "no-such-file"])
        assert sorted(store.list_files()) == sorted([MANIFEST, "data-0", "data-2"])
        with pytest.raises(FileNotFoundError):
            store.read_file("data-1")
        store.delete_files([MANIFEST, "data-0", "data-2"])
        store.remove_location()
        assert store.list_files() == []
        assert open_store(self.uri(root_uri, "ckpt")).list_files() == []

    def test_aborted_file_is_not_listed(self, store: ByteStore) -> None:
        sink = store.create("data-0")
        sink.write([_pattern(10_000, 7)])
        sink.abort()
        assert "data-0" not in store.list_files()

    def test_list_children(
        self, store_backend: StoreBackend, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        assert store_backend.list_children(self.uri(root_uri, "missing")) == []
        for name in ("step-1", "step-2"):
            child = open_store(self.uri(root_uri, name))
            child.prepare()
            child.publish(MANIFEST, b"{}")
        children = store_backend.list_children(root_uri)
        assert sorted(children) == [self.uri(root_uri, "step-1"), self.uri(root_uri, "step-2")]
