"""The shared-memory backend: ``shm://NAME[/SUB...]`` checkpoints in POSIX shared memory.

A checkpoint is a directory of the usual files (same format as on disk)
in the shared-memory filesystem, ``/dev/shm/torchstow-<uid>/NAME/SUB`` by
default (``TORCHSTOW_SHM_DIR`` or the ``shm_dir`` storage option move it).
The files live in RAM and outlive the process that wrote them, so another
process loads them after the writer exits or is killed, until they are
deleted or the machine reboots. Loads read the bytes straight into the
target tensors.

Space is checked before a save writes anything (shared memory is a tmpfs of
limited size), and a save that still runs out of room (another writer got
there first) fails with :class:`StorageFullError` and removes what it wrote:
nothing is committed and no memory is left held.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from torchstow.backends.filesystem import LocalFileStore, subdirectories
from torchstow.errors import UnknownBackendError
from torchstow.spi import DirectoryBackend, hookimpl

if TYPE_CHECKING:
    from torchstow.spi import Register

__all__ = ["SHM_DIR_ENV", "ShmBackend", "ShmStore", "default_shm_dir"]

SHM_DIR_ENV = "TORCHSTOW_SHM_DIR"
_PREFIX = "shm://"


def default_shm_dir() -> str:
    """Where ``shm://`` checkpoints live unless ``shm_dir`` says otherwise."""
    return os.environ.get(SHM_DIR_ENV) or f"/dev/shm/torchstow-{os.getuid()}"


class ShmStore(LocalFileStore):
    """The files of one checkpoint in shared memory (no fsync: RAM has nothing to sync to)."""

    space_hint = (
        "Shared memory is a RAM-backed tmpfs: delete old shm:// checkpoints (torchstow.delete), "
        "enlarge it (mount -o remount,size=... /dev/shm), or save elsewhere"
    )

    def __init__(self, path: str, location: str) -> None:
        super().__init__(path, location, fsync=False)


class ShmBackend(DirectoryBackend):
    """Checkpoints in POSIX shared memory, shared by the processes of one machine.

    Storage options: ``shm_dir`` (the directory in a tmpfs that holds them),
    ``thread_count`` and ``verify_checksums`` as for every store backend.
    """

    schemes = ("shm",)

    def __init__(
        self, *, shm_dir: str | None = None, thread_count: int | None = None, verify_checksums: bool = True
    ) -> None:
        super().__init__(thread_count=thread_count, verify_checksums=verify_checksums)
        self.shm_dir = os.path.abspath(shm_dir or default_shm_dir())

    def path_of(self, uri: str) -> str:
        """The directory in shared memory that ``uri`` names."""
        if not uri.startswith(_PREFIX):
            raise UnknownBackendError(f"{uri!r} is not a shm:// URI (shm://NAME/...): shm wraps no other URI")
        parts = [p for p in uri[len(_PREFIX) :].split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"{uri!r}: '.' and '..' are not allowed in shm:// names")
        return os.path.join(self.shm_dir, *parts)

    def open_store(self, uri: str) -> ShmStore:
        return ShmStore(self.path_of(uri), uri)

    def child_names(self, prefix: str) -> list[str]:
        return subdirectories(self.path_of(prefix))


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register the shared-memory backend for ``shm://`` URIs."""
    register(ShmBackend)
