"""A torchstow byte store keeping checkpoints in one SQLite database file.

``sqlite:///data/ckpts.db/run1/step-100`` is the checkpoint ``run1/step-100``
inside ``/data/ckpts.db``. Each file of a checkpoint is one row
``(dir, name, data)``; publishing the manifest is a single transaction, so it
appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence

from torchstow.spi import ByteStore, CorruptCheckpointError, FileSink, Register, StoreBackend, hookimpl

__all__ = ["SqliteBackend", "SqliteStore"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS files (dir TEXT, name TEXT, data BLOB, PRIMARY KEY (dir, name))"


def split_uri(uri: str) -> tuple[str, str]:
    """``(database file, checkpoint path)`` of a ``sqlite://`` URI."""
    parts = uri.removeprefix("sqlite://").rstrip("/").split("/")
    for i, part in enumerate(parts):
        if part.endswith((".db", ".sqlite")):
            return "/".join(parts[: i + 1]) or "/", "/".join(parts[i + 1 :])
    raise ValueError(f"{uri!r} names no database: use sqlite:///path/to/file.db/checkpoint")


@contextlib.contextmanager
def _connect(db: str) -> Iterator[sqlite3.Connection]:
    # Autocommit, and a busy timeout so concurrent ranks wait for each other's locks. The
    # default rollback journal is kept: switching a shared file to WAL can fail with
    # "database is locked" without waiting, when another process holds it at that moment.
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        conn.execute(_SCHEMA)
        yield conn
    finally:
        conn.close()


class _RowSink(FileSink):
    """A file gathered in memory and stored as one row when closed."""

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
    """The files of one checkpoint: the rows of one ``dir``."""

    def __init__(self, db: str, dir: str, location: str) -> None:
        self.db, self.dir, self.location = db, dir, location

    def prepare(self) -> None:
        os.makedirs(os.path.dirname(self.db) or ".", exist_ok=True)
        with _connect(self.db):
            pass

    def create(self, name: str) -> FileSink:
        return _RowSink(self, name)

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        with _connect(self.db) as conn:
            for offset, buf in requests:
                row = conn.execute(
                    "SELECT substr(data, ?, ?) FROM files WHERE dir = ? AND name = ?",
                    (offset + 1, len(buf), self.dir, name),
                ).fetchone()
                if row is None:
                    raise FileNotFoundError(f"{self.location}/{name}")
                if len(row[0]) < len(buf):
                    raise CorruptCheckpointError(f"{self.location}/{name} is truncated at offset {offset}")
                buf.cast("B")[:] = row[0]

    def read_file(self, name: str) -> bytes:
        with _connect(self.db) as conn:
            row = conn.execute(
                "SELECT data FROM files WHERE dir = ? AND name = ?", (self.dir, name)
            ).fetchone()
        if row is None:
            raise FileNotFoundError(f"{self.location}/{name}")
        return bytes(row[0])

    def publish(self, name: str, data: bytes) -> None:
        with _connect(self.db) as conn:
            conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (self.dir, name, data))

    def publish_new(self, name: str, data: bytes) -> None:
        # Exclusive: the (dir, name) primary key refuses a second row.
        try:
            with _connect(self.db) as conn:
                conn.execute("INSERT INTO files VALUES (?, ?, ?)", (self.dir, name, data))
        except sqlite3.IntegrityError as exc:
            raise FileExistsError(f"{self.location}/{name} exists") from exc

    def list_files(self) -> list[str]:
        if not os.path.exists(self.db):
            return []
        with _connect(self.db) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM files WHERE dir = ?", (self.dir,))]

    def delete_files(self, names: Sequence[str]) -> None:
        with _connect(self.db) as conn:
            conn.executemany("DELETE FROM files WHERE dir = ? AND name = ?", [(self.dir, n) for n in names])

    def remove_location(self) -> None:
        pass  # a checkpoint's "directory" is only the rows that name it


class SqliteBackend(StoreBackend):
    """Checkpoints as rows of a SQLite database file."""

    schemes = ("sqlite",)

    def open_store(self, uri: str) -> SqliteStore:
        db, dir = split_uri(uri)
        return SqliteStore(db, dir, uri.rstrip("/"))

    def list_children(self, prefix: str) -> list[str]:
        db, dir = split_uri(prefix)
        if not os.path.exists(db):
            return []
        start = f"{dir}/" if dir else ""
        with _connect(db) as conn:
            dirs = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT dir FROM files WHERE substr(dir, 1, ?) = ?", (len(start), start)
                )
            ]
        children = sorted({d[len(start) :].split("/", 1)[0] for d in dirs if d != dir})
        return [f"{prefix.rstrip('/')}/{child}" for child in children]


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register the ``sqlite://`` backend."""
    register(SqliteBackend)
