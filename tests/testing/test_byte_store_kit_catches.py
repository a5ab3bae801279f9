"""The byte-store kit catches each classic defect of a store, deterministically, in its
normal run: a correct SQLite store passes every case, and each broken variant fails the
case of its defect with a message naming the rule and the fix.

The stores: a small SQLite byte store written the way the plugin tutorial teaches, and
broken variants of it, each with one classic defect."""

from __future__ import annotations

import inspect
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from torchstow.spi import ByteStore, CorruptCheckpointError, FileSink
from torchstow.testing import ByteStoreConformance

_SCHEMA = "CREATE TABLE IF NOT EXISTS files (dir TEXT, name TEXT, data BLOB, PRIMARY KEY (dir, name))"


class _Sink(FileSink):
    def __init__(self, store: SqliteStore, name: str) -> None:
        self.store, self.name, self.data = store, name, bytearray()

    def write(self, buffers: Sequence[memoryview | bytes | bytearray]) -> None:
        for buf in buffers:
            self.data += buf

    def close(self) -> None:
        self.store.publish(self.name, bytes(self.data))

    def abort(self) -> None:
        self.data = bytearray()


class SqliteStore(ByteStore):
    """The files of checkpoint ``dir`` in database ``db``: one row each. Correct."""

    def __init__(self, db: str, dir: str) -> None:
        self.db, self.dir, self.location = db, dir, f"{db}/{dir}"

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute(_SCHEMA)
        return conn

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        conn = self.connect()
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def prepare(self) -> None:
        self._run("SELECT 1")

    def create(self, name: str) -> FileSink:
        return _Sink(self, name)

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        for offset, buf in requests:
            got = self._range(name, offset, len(buf))
            if len(got) < len(buf):
                raise CorruptCheckpointError(f"{self.location}/{name} is truncated at offset {offset}")
            buf.cast("B")[:] = got

    def _range(self, name: str, offset: int, nbytes: int) -> bytes:
        rows = self._run(
            "SELECT substr(data, ?, ?) FROM files WHERE dir = ? AND name = ?",
            (offset + 1, nbytes, self.dir, name),
        )
        if not rows:
            raise FileNotFoundError(f"{self.location}/{name}")
        return bytes(rows[0][0])  # type: ignore[arg-type]

    def read_file(self, name: str) -> bytes:
        rows = self._run("SELECT data FROM files WHERE dir = ? AND name = ?", (self.dir, name))
        if not rows:
            raise FileNotFoundError(f"{self.location}/{name}")
        return bytes(rows[0][0])  # type: ignore[arg-type]

    def publish(self, name: str, data: bytes) -> None:
        self._run("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (self.dir, name, data))

    def publish_new(self, name: str, data: bytes) -> None:
        try:
            self._run("INSERT INTO files VALUES (?, ?, ?)", (self.dir, name, data))
        except sqlite3.IntegrityError as exc:
            raise FileExistsError(f"{self.location}/{name} exists") from exc

    def list_files(self) -> list[str]:
        return [str(r[0]) for r in self._run("SELECT name FROM files WHERE dir = ?", (self.dir,))]

    def delete_files(self, names: Sequence[str]) -> None:
        for name in names:
            self._run("DELETE FROM files WHERE dir = ? AND name = ?", (self.dir, name))

    def remove_location(self) -> None:
        pass


class DefaultPublishNew(SqliteStore):
    """Keeps ByteStore's default publish_new: list, then publish."""

    publish_new = ByteStore.publish_new


class CheckThenInsert(SqliteStore):
    """publish_new as a SELECT, then an INSERT OR REPLACE: two statements, not one."""

    def publish_new(self, name: str, data: bytes) -> None:
        if self._run("SELECT 1 FROM files WHERE dir = ? AND name = ?", (self.dir, name)):
            raise FileExistsError(f"{self.location}/{name} exists")
        self.publish(name, data)


_PUBLISHING = threading.Lock()


class CheckThenInsertUnderALock(CheckThenInsert):
    """The check and the insert under one lock of this process: exclusive among its threads,
    not among processes (other ranks, another job)."""

    def publish_new(self, name: str, data: bytes) -> None:
        with _PUBLISHING:
            super().publish_new(name, data)


_NAMES: dict[tuple[str, str], set[str]] = {}


class ListingInMemory(SqliteStore):
    """Lists the names this process wrote, from a module-level index, not the database."""

    def _index(self) -> set[str]:
        return _NAMES.setdefault((self.db, self.dir), set())

    def publish(self, name: str, data: bytes) -> None:
        super().publish(name, data)
        self._index().add(name)

    def list_files(self) -> list[str]:
        return sorted(self._index())

    def delete_files(self, names: Sequence[str]) -> None:
        super().delete_files(names)
        self._index().difference_update(names)


_CONNECTIONS: dict[str, sqlite3.Connection] = {}


class SharedConnection(SqliteStore):
    """One connection per database for the whole process, opened once: across fork too."""

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        conn = _CONNECTIONS.get(self.db)
        if conn is None:
            conn = _CONNECTIONS[self.db] = self.connect()
        return conn.execute(sql, args).fetchall()


class MissingReadsEmpty(SqliteStore):
    """Reads a missing file as empty instead of raising FileNotFoundError."""

    def read_file(self, name: str) -> bytes:
        rows = self._run("SELECT data FROM files WHERE dir = ? AND name = ?", (self.dir, name))
        return bytes(rows[0][0]) if rows else b""  # type: ignore[arg-type]


class ShortAtEnd(SqliteStore):
    """Copies what a ranged read got, never checking that it filled the buffer."""

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        for offset, buf in requests:
            got = self._range(name, offset, len(buf))
            buf.cast("B")[: len(got)] = got


class ShortOnlyFirst(SqliteStore):
    """Checks the length of the first ranged request of a call only."""

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        for i, (offset, buf) in enumerate(requests):
            got = self._range(name, offset, len(buf))
            if i == 0 and len(got) < len(buf):
                raise CorruptCheckpointError(f"{self.location}/{name} is truncated at offset {offset}")
            buf.cast("B")[: len(got)] = got


class LandsBeforeReading(SqliteStore):
    """Reports every request of read_in_order as landed, then reads them."""

    def read_in_order(
        self, name: str, requests: Sequence[tuple[int, memoryview]], landed: Callable[[int], None]
    ) -> None:
        for i in range(len(requests)):
            landed(i)
        self.read_into(name, requests)


class ReadsPastTheLimit(SqliteStore):
    """Defect: a ``read_small_file`` of its own that ignores the limit (reads anything whole)."""

    def read_small_file(self, name: str, limit: int) -> bytes | None:
        return self.read_file(name)


class DeleteSkipsHidden(SqliteStore):
    """Deletes only names that look like checkpoint files, leaving publish debris behind."""

    def delete_files(self, names: Sequence[str]) -> None:
        super().delete_files([n for n in names if not n.startswith(".")])


class PrefixKeys(SqliteStore):
    """Treats a location as a key prefix: lists and deletes the files of nested locations too."""

    def list_files(self) -> list[str]:
        rows = self._run(
            "SELECT dir, name FROM files WHERE dir = ? OR dir LIKE ?", (self.dir, f"{self.dir}/%")
        )
        return [f"{d}/{n}"[len(self.dir) + 1 :] for d, n in rows]  # type: ignore[str-bytes-safe]

    def delete_files(self, names: Sequence[str]) -> None:
        super().delete_files(names)
        for name in names:
            self._run("DELETE FROM files WHERE dir LIKE ? AND name = ?", (f"{self.dir}/%", name))


def opener(kind: type[SqliteStore], db: str) -> Callable[[str], ByteStore]:
    """``open_store`` for the kit: ``sqlite-kit://<db>/<dir>`` opens ``kind`` on that ``dir``."""

    def open_store(uri: str) -> ByteStore:
        return kind(db, uri.removeprefix(f"sqlite-kit://{db}/"))

    return open_store


class Kit(ByteStoreConformance):
    scheme = "sqlite-kit"


def _run(test_name: str, kind: type[SqliteStore], tmp_path: Path) -> None:
    """Run the kit's test ``test_name`` on a store of ``kind``, its fixtures built by hand."""
    db = str(tmp_path / "kit.db")
    root = f"sqlite-kit://{db}/run"
    open_store = opener(kind, db)
    fixtures: dict[str, Any] = {"root_uri": root, "open_store": open_store}
    store = open_store(Kit.uri(root, "ckpt"))
    store.prepare()
    fixtures["store"] = store
    test: Callable[..., None] = getattr(Kit(), test_name)
    wanted = inspect.signature(test).parameters
    test(**{name: fixtures[name] for name in wanted})


_TESTS = sorted(
    name
    for name in dir(ByteStoreConformance)
    if name.startswith("test_") and name != "test_list_children"  # needs a backend, not only stores
)


@pytest.mark.parametrize("test_name", _TESTS)
def test_a_correct_store_passes(test_name: str, tmp_path: Path) -> None:
    _run(test_name, SqliteStore, tmp_path)


@pytest.mark.parametrize(
    ("kind", "test_name", "rule"),
    [
        (DefaultPublishNew, "test_publish_new_is_exclusive_under_a_race", "publish_new is exclusive"),
        (ListingInMemory, "test_another_process_sees_listing_and_publish", "another process sees"),
        (SharedConnection, "test_works_in_a_process_forked_after_use", "forked after the store was used"),
        (MissingReadsEmpty, "test_missing_file_is_file_not_found", "a missing file is FileNotFoundError"),
        (ShortAtEnd, "test_short_read_is_corrupt", "cannot fill whole is CorruptCheckpointError"),
        (ShortOnlyFirst, "test_short_read_is_corrupt", "cannot fill whole is CorruptCheckpointError"),
        (LandsBeforeReading, "test_read_in_order_reports_each_request_once_filled", "once filled"),
        (ReadsPastTheLimit, "test_read_small_file_is_bounded", "None for a larger one"),
        (
            DeleteSkipsHidden,
            "test_delete_removes_what_it_is_given_and_nothing_else",
            "delete_files removes",
        ),
        (PrefixKeys, "test_delete_removes_what_it_is_given_and_nothing_else", "delete_files removes"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_each_defect_is_caught_with_its_rule(
    kind: type[SqliteStore], test_name: str, rule: str, tmp_path: Path
) -> None:
    with pytest.raises(AssertionError) as caught:
        _run(test_name, kind, tmp_path)
    message = str(caught.value)
    first_line = message.split("\n", 1)[0]
    assert first_line.startswith("rule broken: ") and rule in first_line, message
    assert "\nhow to fix: " in message, message


@pytest.mark.parametrize("kind", [CheckThenInsert, CheckThenInsertUnderALock], ids=lambda k: k.__name__)
def test_a_check_then_insert_in_sql_is_caught_every_time(kind: type[SqliteStore], tmp_path: Path) -> None:
    """The defect of the blind plugin: a SELECT, then an INSERT, with no check the kit can slow
    down, even under a lock of its process. The kit's racers in two processes, on fresh names,
    still catch it, run after run."""
    for run in range(5):
        (tmp_path / str(run)).mkdir()
        with pytest.raises(AssertionError, match="rule broken: publish_new is exclusive"):
            _run("test_publish_new_is_exclusive_under_a_race", kind, tmp_path / str(run))
