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

The per-user default directory must be this user's own: one another user made
first (anyone may create names in /dev/shm) is refused with :class:`StorageIOError`.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from torchstow.backends.filesystem import LocalFileStore, subdirectories
from torchstow.errors import StorageIOError, UnknownBackendError
from torchstow.spi import DirectoryBackend, hookimpl

if TYPE_CHECKING:
    from torchstow.spi import Register

__all__ = ["SHM_DIR_ENV", "ShmBackend", "ShmStore", "default_shm_dir"]

SHM_DIR_ENV = "TORCHSTOW_SHM_DIR"
_PREFIX = "shm://"


def default_shm_dir() -> str:
    """Where ``shm://`` checkpoints live unless ``shm_dir`` says otherwise."""
    return os.environ.get(SHM_DIR_ENV) or f"/dev/shm/torchstow-{os.getuid()}"


def _check_owned(base: str) -> None:
    """Refuse the per-user directory ``base`` when it is not this user's own directory (made
    by another user, or a link): anyone may create names in /dev/shm, and one who made
    ``torchstow-<uid>`` first could read, replace or plant that user's checkpoints."""
    try:
        st = os.lstat(base)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        return
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory (a link?)"
    raise StorageIOError(
        f"{base}, where this user's shm:// checkpoints live, is {kind} owned by uid {st.st_uid}, "
        f"not by this user (uid {os.getuid()}): another user may have made it to read or replace "
        f"them. Remove it (as its owner or root), or set {SHM_DIR_ENV} or shm_dir to a directory of yours"
    )


class ShmStore(LocalFileStore):
    """The files of one checkpoint in shared memory (no fsync: RAM has nothing to sync to).

    ``owned``: the per-user directory whose owner is checked (again after ``prepare``
    made it, in case another user made it first); None for a directory the caller chose.
    """

    space_hint = (
        "Shared memory is a RAM-backed tmpfs: delete old shm:// checkpoints (torchstow.delete), "
        "enlarge it (mount -o remount,size=... /dev/shm), or save elsewhere"
    )

    def __init__(self, path: str, location: str, owned: str | None = None) -> None:
        super().__init__(path, location, fsync=False)
        self.owned = owned

    def prepare(self) -> None:
        super().prepare()
        if self.owned is not None:
            _check_owned(self.owned)


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
        #: The per-user default directory is checked to be this user's; one chosen is not
        #: (a team may share one).
        self._owned = None if shm_dir or os.environ.get(SHM_DIR_ENV) else self.shm_dir

    def path_of(self, uri: str) -> str:
        """The directory in shared memory that ``uri`` names."""
        if not uri.startswith(_PREFIX):
            raise UnknownBackendError(f"{uri!r} is not a shm:// URI (shm://NAME/...): shm wraps no other URI")
        parts = [p for p in uri[len(_PREFIX) :].split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"{uri!r}: '.' and '..' are not allowed in shm:// names")
        return os.path.join(self.shm_dir, *parts)

    def _checked_path(self, uri: str) -> str:
        """:meth:`path_of`, once this user's own folder is checked to be still its own."""
        path = self.path_of(uri)
        if self._owned is not None:
            _check_owned(self._owned)
        return path

    def open_store(self, uri: str) -> ShmStore:
        return ShmStore(self._checked_path(uri), uri, self._owned)

    def child_names(self, prefix: str) -> list[str]:
        return subdirectories(self._checked_path(prefix))


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register the shared-memory backend for ``shm://`` URIs."""
    register(ShmBackend)
