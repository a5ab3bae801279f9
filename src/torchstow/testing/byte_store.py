"""The byte-store conformance kit: the :class:`~torchstow.spi.ByteStore` contract, called directly.

The layout writer and reader rely on these rules; a store that breaks one
shows up here with a one-line reason instead of as a puzzling failed load.
Subclass :class:`ByteStoreConformance` and set ``scheme``; the stores come
from your :class:`~torchstow.spi.StoreBackend` (override ``store_backend`` or
``open_store`` to build them another way).
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pytest

from torchstow.spi import (
    MANIFEST,
    ByteStore,
    CorruptCheckpointError,
    StoreBackend,
    open_backend,
    temporary_name,
)
from torchstow.testing._fork import ForkedWorker, can_fork, run_forked
from torchstow.testing._rules import rule
from torchstow.testing.base import ConformanceBase

__all__ = ["ByteStoreConformance"]


def _pattern(nbytes: int, seed: int) -> bytes:
    """``nbytes`` random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(nbytes)


def _write(store: ByteStore, name: str, pieces: Sequence[bytes | bytearray]) -> None:
    sink = store.create(name)
    sink.write([memoryview(p) for p in pieces])
    sink.close()


_EXCLUSIVE_FIX = (
    "create the file with one exclusive operation of the medium (os.link of a finished "
    "temporary file, open with O_EXCL, a conditional PUT with If-None-Match: *, an INSERT "
    "refused by a primary key), never a check followed by publish; a medium that has none "
    "sets exclusive_commits = False on the kit class (two saves racing to create one "
    "checkpoint can then both commit)"
)


def _widened(method: Callable[..., Any], delay: float) -> Callable[..., Any]:
    """``method``, which then waits ``delay`` seconds: a check made through the store's own
    query methods stays stale long enough for every racer to make it."""

    @functools.wraps(method)
    def slow(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            time.sleep(delay)

    return slow


def _racing_stores(open_store: Callable[[str], ByteStore], location: str, count: int) -> list[ByteStore]:
    """``count`` stores at ``location``, set up, whose query methods answer late (:func:`_widened`)."""
    stores = [open_store(location) for _ in range(count)]
    for store in stores:
        store.list_files()  # connections and clients are set up before the race
        for query in ("list_files", "read_file", "file_sizes"):
            setattr(store, query, _widened(getattr(store, query), 0.02))
    return stores


def _race(stores: list[ByteStore], name: str, tag: str) -> list[tuple[bytes, str]]:
    """``publish_new(name)`` on every store at once, from threads released by a barrier, the GIL
    switching every microsecond: ``(bytes published, "won" | "lost" | the error)`` for each."""
    start = threading.Barrier(len(stores))
    payloads = [f"{tag} racer {i}".encode() for i in range(len(stores))]
    outcomes = ["not run"] * len(stores)

    def race(i: int) -> None:
        try:
            start.wait(timeout=60)
            stores[i].publish_new(name, payloads[i])
            outcomes[i] = "won"
        except FileExistsError:
            outcomes[i] = "lost"
        except BaseException as exc:
            outcomes[i] = repr(exc)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    return list(zip(payloads, outcomes, strict=True))


@contextlib.contextmanager
def _racers(
    open_store: Callable[[str], ByteStore], location: str, count: int, processes: bool, timeout: float
) -> Iterator[Callable[[str], list[tuple[bytes, str]]]]:
    """``race(name)``: ``count`` racers on ``name``, split between two forked processes where
    ``processes`` (and fork) allow, else threads of this process."""
    if not (processes and can_fork() and count >= 2):
        stores = _racing_stores(open_store, location, count)
        yield lambda name: _race(stores, name, "here")
        return

    def serve_with(share: int, tag: str) -> Callable[[str], list[tuple[bytes, str]]]:
        stores: list[ByteStore] = []

        def serve(name: str) -> list[tuple[bytes, str]]:
            if not stores:  # opened in the child, after the fork
                stores.extend(_racing_stores(open_store, location, share))
            return _race(stores, name, tag)

        return serve

    shares = [count // 2, count - count // 2]
    workers = [ForkedWorker(serve_with(n, f"process {i}"), timeout=timeout) for i, n in enumerate(shares)]
    try:

        def race(name: str) -> list[tuple[bytes, str]]:
            for worker in workers:
                worker.send(name)
            return [outcome for worker in workers for outcome in worker.receive()]

        yield race
    finally:
        for worker in workers:
            worker.close()


class ByteStoreConformance(ConformanceBase):
    """Contract tests for the byte store of a torchstow backend; subclass and set ``scheme``.

    Capability flags (class attributes): ``exclusive_commits`` (False skips the
    ``publish_new`` race), ``shared_between_processes`` (False, for a store that
    keeps its files in one process's memory, skips the check that another
    process sees them). ``threads`` writers share one store in the concurrency
    test; ``racers`` calls of ``publish_new`` race on each fresh name, for
    ``race_rounds`` names or ``race_seconds``, whichever ends first; ``fork_timeout``
    bounds each forked child.
    """

    threads: ClassVar[int] = 8  # writers that share one store instance in the concurrency test
    racers: ClassVar[int] = 8
    race_rounds: ClassVar[int] = 100
    race_seconds: ClassVar[float] = 20.0
    shared_between_processes: ClassVar[bool] = True
    fork_timeout: ClassVar[float] = 60.0

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

    @rule(
        "read_into and read_file return exactly the bytes written through create/write/close",
        "append each buffer in order in FileSink.write; fill each (offset, buffer) of read_into "
        "from that offset of the file",
    )
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
        assert store.read_file("data-0") == whole, "read_file gave other bytes than were written"
        assert store.read_file("empty") == b"", "an empty file read back as non-empty"
        requests = [(60_000, 4096), (0, 10), (len(whole) - 7, 7), (999, 2)]
        buffers = [(offset, memoryview(bytearray(n))) for offset, n in requests]
        store.read_into("data-0", buffers)
        for offset, buf in buffers:
            assert bytes(buf) == whole[offset : offset + len(buf)], f"read_into at offset {offset}"
        assert sorted(store.list_files()) == ["data-0", "empty"]

    @rule(
        "a missing file is FileNotFoundError, also in a location never prepared",
        "raise FileNotFoundError (or a subclass) from read_file and read_into when the file or "
        "its location does not exist",
    )
    def test_missing_file_is_file_not_found(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        never_prepared = open_store(self.uri(root_uri, "nothing-here"))
        for where in (store, never_prepared):
            with pytest.raises(FileNotFoundError):
                where.read_file("missing")
            with pytest.raises(FileNotFoundError):
                where.read_into("missing", [(0, memoryview(bytearray(4)))])

    @rule(
        "read_small_file returns a file of at most the limit whole, and None for a larger one",
        "keep ByteStore.read_small_file's default, or in your override tell the file's size before "
        "reading its bytes (a stat, a Content-Length) and return None when it holds more than the "
        "limit; a missing file is FileNotFoundError",
    )
    def test_read_small_file_is_bounded(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        data = _pattern(1000, 5)
        _write(store, "data-0", [data])
        _write(store, "empty", [])
        assert store.read_small_file("data-0", 1000) == data, "a file at the limit was not read whole"
        assert store.read_small_file("data-0", 1 << 30) == data, "a file under the limit was not read whole"
        assert store.read_small_file("data-0", 999) is None, "a file over the limit was not refused (None)"
        assert store.read_small_file("empty", 0) == b"", "an empty file read back as non-empty"
        never_prepared = open_store(self.uri(root_uri, "nothing-here"))
        for where in (store, never_prepared):
            with pytest.raises(FileNotFoundError):
                where.read_small_file("missing", 100)

    @rule(
        "a ranged read that the file cannot fill whole is CorruptCheckpointError",
        "compare the bytes each ranged request got with the buffer's length (a short answer at "
        "the end of the file is not an error to the medium) and raise "
        "torchstow.spi.CorruptCheckpointError('<location>/<name> is truncated at offset ...') "
        "when fewer came back",
    )
    def test_short_read_is_corrupt(self, store: ByteStore) -> None:
        data = _pattern(100, 4)
        _write(store, "data-0", [data])
        exact = memoryview(bytearray(10))
        store.read_into("data-0", [(90, exact)])  # up to the last byte: not short
        assert bytes(exact) == data[90:], "a read ending at the last byte got other bytes"
        cases = {
            "across the end": [(90, 20)],
            "at the end": [(100, 1)],
            "past the end": [(500, 8)],
            "the last of several requests across the end": [(0, 10), (50, 10), (95, 10)],
            "one byte over, after a whole request": [(0, 100), (1, 100)],
        }
        for case, requests in cases.items():
            buffers = [(offset, memoryview(bytearray(n))) for offset, n in requests]
            error: CorruptCheckpointError | None = None
            try:
                store.read_into("data-0", buffers)
            except CorruptCheckpointError as exc:
                error = exc
            assert error is not None, f"a read {case} of a 100-byte file ({requests}) raised nothing"
            assert "data-0" in str(error) and "truncated" in str(error), (
                f"the error of a read {case} does not say 'data-0 ... is truncated': {error}"
            )

    @rule(
        "read_in_order fills the requests and reports each with landed(i), in order, once filled",
        "read the requests in the order given and call landed(i) only after request i's buffer "
        "holds its bytes, for every i in turn (ByteStore's default does so through read_into); "
        "a missing file and a short read fail as in read_into",
    )
    def test_read_in_order_reports_each_request_once_filled(self, store: ByteStore) -> None:
        data = _pattern(300_000, 7)
        _write(store, "data-0", [data])
        spans = [(0, 10), (10, 0), (100, 150_000), (150_100, 100_000), (250_100, 3), (260_000, 40_000)]
        requests = [(offset, memoryview(bytearray(n))) for offset, n in spans]
        reported: list[int] = []

        def landed(i: int) -> None:
            assert i == len(reported), f"landed({i}) came after landed{tuple(reported)}, not in order"
            offset, buf = requests[i]
            assert bytes(buf) == data[offset : offset + len(buf)], (
                f"landed({i}) was called before request {i} (offset {offset}) held its bytes"
            )
            reported.append(i)

        store.read_in_order("data-0", requests, landed)
        assert reported == list(range(len(requests))), f"landed reported {reported} of {len(requests)}"
        with pytest.raises(FileNotFoundError):
            store.read_in_order("missing", [(0, memoryview(bytearray(4)))], lambda i: None)
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            store.read_in_order("data-0", [(299_990, memoryview(bytearray(20)))], lambda i: None)

    @rule(
        "publish replaces a file atomically: a reader sees the old file or the new one, whole",
        "write to a temporary name (torchstow.spi.temporary_name) and rename it into place, or "
        "use one single-request PUT or one transaction; remove the temporary file afterwards",
    )
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

    @rule(
        "one store is used from many threads at once, each writing its own file",
        "keep no per-call state on the store instance (a shared buffer, cursor or connection "
        "without a lock); give each FileSink its own state",
    )
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

    @rule(
        "list_files names the files at the location; delete_files removes them, ignoring unknown names",
        "list the medium (not a record kept by the instance); return [] for a missing location; "
        "in delete_files skip names that do not exist instead of raising",
    )
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

    @rule(
        "delete_files removes every file it is given (data, manifest, dot-named publish debris) "
        "and nothing of a nested or sibling location; list_files does not descend into nested ones",
        "delete each named file of this location whatever its name (a name starting with '.' "
        "included); on an object store list with a delimiter (keys directly under the prefix) "
        "and delete the exact keys <location>/<name>, never by a prefix match",
    )
    def test_delete_removes_what_it_is_given_and_nothing_else(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        nested = open_store(self.uri(self.uri(root_uri, "ckpt"), "step-1"))
        sibling = open_store(self.uri(root_uri, "ckpt-2"))
        for other in (nested, sibling):
            other.prepare()
            _write(other, "data-x-0-0.bin", [b"keep me"])
            other.publish(MANIFEST, b"{}")
        names = ["data-a-0-0.bin", "data-a-1-0.bin", temporary_name(MANIFEST, "a1b2"), "notes"]
        for name in names:
            _write(store, name, [name.encode()])
        store.publish(MANIFEST, b"{}")
        listed = sorted(store.list_files())
        assert listed == sorted([*names, MANIFEST]), (
            f"list_files of a location with a nested location gave {listed}"
        )
        store.delete_files([*names, MANIFEST])
        left = store.list_files()
        assert left == [], f"delete_files left {left} behind"
        for name in [*names, MANIFEST]:
            with pytest.raises(FileNotFoundError):
                store.read_file(name)
        store.remove_location()
        for what, other in (("nested", nested), ("sibling", sibling)):
            files = sorted(other.list_files())
            assert files == sorted([MANIFEST, "data-x-0-0.bin"]), (
                f"deleting a location's files changed its {what} location: it lists {files}"
            )
            assert other.read_file("data-x-0-0.bin") == b"keep me", f"the {what} location's file changed"

    @rule(
        "an aborted file is not listed",
        "in FileSink.abort remove what was written (or write to a temporary name that only "
        "close renames into place)",
    )
    def test_aborted_file_is_not_listed(self, store: ByteStore) -> None:
        sink = store.create("data-0")
        sink.write([_pattern(10_000, 7)])
        sink.abort()
        assert "data-0" not in store.list_files()

    @rule(
        "list_children lists the locations directly under a prefix, spelled like the prefix, "
        "and [] for a missing prefix",
        "return f'{prefix}/{name}' for each child (or subclass DirectoryBackend and implement "
        "child_names); return [] instead of raising when the prefix does not exist",
    )
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

    @rule("publish_new is exclusive: of calls racing on one new name exactly one succeeds", _EXCLUSIVE_FIX)
    def test_publish_new_is_exclusive_under_a_race(
        self, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        """``racers`` threads, each with its own store instance (as ranks and separate saves
        have), split between two forked processes (one process, for a store that is not
        shared between processes or without ``os.fork``), are released together on a
        fresh name, round after round. The race is forced rather than hoped for: the GIL
        switches threads every microsecond, and the store's own query methods
        (``list_files``, ``read_file``, ``file_sizes``) wait a little after answering, so
        an answer used as a check is stale by the time any racer acts on it."""
        if not self.exclusive_commits:
            pytest.skip(f"{type(self).__name__} declares no exclusive commits (exclusive_commits = False)")
        location = self.uri(root_uri, "race")
        checker = open_store(location)
        checker.prepare()
        deadline = time.monotonic() + self.race_seconds
        with _racers(
            open_store, location, self.racers, self.shared_between_processes, self.fork_timeout
        ) as race:
            for round_ in range(self.race_rounds):
                if round_ and time.monotonic() > deadline:
                    break
                name = f"race-{round_}.json"
                outcomes = race(name)
                failed = [outcome for _, outcome in outcomes if outcome not in ("won", "lost")]
                assert not failed, f"publish_new raised {failed[0]} (not FileExistsError) in a race"
                winners = [payload for payload, outcome in outcomes if outcome == "won"]
                assert len(winners) == 1, (
                    f"{len(winners)} of {len(outcomes)} publish_new calls racing on the new name "
                    f"{name!r} succeeded (round {round_ + 1}); exactly one may, the others must "
                    "raise FileExistsError"
                )
                got = checker.read_file(name)
                assert got == winners[0], f"{name!r} holds {got!r}, not the bytes of the racer that won"

    @rule(
        "another process sees this store's files: listings, published files and deletions go "
        "through the medium, not a record kept in one process's memory",
        "answer list_files, read_file and file_sizes from the medium on every call (no listing "
        "cached in the instance or the module); a store that only lives in one process sets "
        "shared_between_processes = False on the kit class (and cannot serve distributed saves)",
    )
    def test_another_process_sees_listing_and_publish(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        if not self.shared_between_processes:
            pytest.skip(
                f"{type(self).__name__} keeps its files in one process (shared_between_processes = False)"
            )
        if not can_fork():
            pytest.skip("needs os.fork")
        location = self.uri(root_uri, "ckpt")
        _write(store, "data-parent", [b"parent"])
        store.publish(MANIFEST, b"v1")
        assert sorted(store.list_files()) == sorted([MANIFEST, "data-parent"])

        def other_process() -> None:
            there = open_store(location)
            _write(there, "data-child", [b"child"])
            there.publish(MANIFEST, b"v2")
            there.delete_files(["data-parent"])

        run_forked(other_process, timeout=self.fork_timeout)
        for which, here in (("the store used before", store), ("a new store", open_store(location))):
            after = f"after another process wrote data-child, published {MANIFEST} and deleted data-parent"
            assert here.read_file("data-child") == b"child", f"{after}, {which} reads data-child wrong"
            assert here.read_file(MANIFEST) == b"v2", f"{after}, {which} reads the old {MANIFEST}"
            with pytest.raises(FileNotFoundError):
                here.read_file("data-parent")
            listed = sorted(here.list_files())
            assert listed == sorted([MANIFEST, "data-child"]), f"{after}, {which} lists {listed}"
            sizes = here.file_sizes()
            assert sizes is None or sizes == {MANIFEST: 2, "data-child": 5}, (
                f"{after}, {which} gives the file sizes {sizes}"
            )

    @rule(
        "a store opened in a process forked after the store was used works there, on its own "
        "connections (none opened before the fork is shared with the child)",
        "open connections, sockets, clients and thread pools lazily per process: remember "
        "os.getpid() with each one and open a new one when it differs (or reset them in "
        "os.register_at_fork(after_in_child=...)); never keep one in a module global across fork",
    )
    def test_works_in_a_process_forked_after_use(
        self, store: ByteStore, root_uri: str, open_store: Callable[[str], ByteStore]
    ) -> None:
        """The test process uses the store, then forks. In the child, every socket and
        regular file it inherited is pointed at /dev/null first: a connection shared with
        the parent would, sooner or later, interleave its requests with the parent's; here it
        fails at once. A store that opens its own connections in the child is unaffected."""
        if not can_fork():
            pytest.skip("needs os.fork")
        location = self.uri(root_uri, "ckpt")
        _write(store, "data-parent", [_pattern(5000, 8)])
        store.publish(MANIFEST, b"v1")
        assert store.read_file("data-parent") == _pattern(5000, 8)
        store.list_files()

        def child() -> None:
            there = open_store(location)
            there.prepare()
            got = there.read_file("data-parent")
            assert got == _pattern(5000, 8), f"in the child, data-parent read back as {len(got)} other bytes"
            _write(there, "data-child", [_pattern(3000, 9)])
            there.publish(MANIFEST, b"v2")
            listed = sorted(there.list_files())
            assert listed == sorted([MANIFEST, "data-child", "data-parent"]), f"the child lists {listed}"
            assert there.read_file("data-child") == _pattern(3000, 9)

        run_forked(child, timeout=self.fork_timeout, cut_connections=True)
        if self.shared_between_processes:
            assert store.read_file("data-child") == _pattern(3000, 9), "the child's file is not in the store"
            assert store.read_file(MANIFEST) == b"v2"
        assert store.read_file("data-parent") == _pattern(5000, 8), "the parent's store broke after the fork"
