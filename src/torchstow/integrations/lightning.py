"""Lightning ``CheckpointIO`` plugins that save and load through any torchstow URI.

``Trainer(plugins=[TorchstowCheckpointIO()], default_root_dir="s3://bucket/run")``:
``ModelCheckpoint`` then saves, removes and resumes torchstow checkpoints. Each
Lightning checkpoint path (``.../epoch=0-step=2.ckpt``) is one torchstow
checkpoint location (a directory, an object prefix). Non-tensor parts of the
checkpoint dict are stored as JSON, or in the restricted format
``torch.load(weights_only=True)`` reads; anything else needs ``allow_pickle=True``
and the error names its key. See docs/lightning.md.

Importing this module registers an fsspec filesystem for ``shm://`` (the
files of torchstow's shared-memory backend, under ``TORCHSTOW_SHM_DIR``), so
Lightning's own path operations on ``shm://`` URIs work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

try:
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchstow.integrations.lightning needs Lightning: pip install 'torchstow[lightning]'"
    ) from exc

import torchstow
from torchstow.backends.shm import default_shm_dir

__all__ = ["AsyncTorchstowCheckpointIO", "TorchstowCheckpointIO", "last_checkpoint"]

logger = logging.getLogger("torchstow.integrations")

_SHM = "shm://"


class ShmFileSystem(LocalFileSystem):
    """fsspec's local filesystem, reached through ``shm://NAME/...`` as torchstow's shm backend
    names its checkpoints (under ``TORCHSTOW_SHM_DIR``, default ``/dev/shm/torchstow-<uid>``)."""

    protocol = ("shm",)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        text = str(path)
        if text.startswith(_SHM):
            text = os.path.join(default_shm_dir(), text[len(_SHM) :].lstrip("/"))
        return super()._strip_protocol(text)


with contextlib.suppress(ValueError):  # another package serves shm:// already: leave it be
    fsspec.register_implementation("shm", ShmFileSystem, clobber=False)


def _location(path: Any) -> str:
    """The torchstow URI of a Lightning checkpoint path."""
    return os.fspath(path) if not isinstance(path, str) else path


class TorchstowCheckpointIO(CheckpointIO):
    """Save, load and remove Lightning checkpoints as torchstow checkpoints.

    ``storage_options`` go to every torchstow call (endpoints, credentials,
    ``thread_count``...). ``allow_pickle`` lets values that only full pickle can
    store be saved and loaded (off: such a value is a ``PickleNotAllowedError``
    naming its key). Saves never wait for other ranks (Lightning calls
    ``save_checkpoint`` on global rank 0 alone); loads read in this process.

    The checkpoint a run resumed from is removed only once a newer checkpoint
    was committed after the resume; a removal asked for earlier is skipped
    with a warning.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *, allow_pickle: bool = False) -> None:
        super().__init__()
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._commits = 0  # checkpoints committed by this plugin
        self._resumed: dict[str, int] = {}  # location -> commits when it was loaded
        self._folders: set[str] = set()  # where this plugin saved checkpoints off local paths

    # -- what Lightning calls ----------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` at ``path``, replacing a committed one there (``last.ckpt``)."""
        uri = self._saving(path)
        torchstow.save(checkpoint, uri, **self._save_arguments(checkpoint, storage_options))
        with self._lock:
            self._commits += 1

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path``, tensors on the CPU (or where ``map_location`` says).
        ``weights_only=False`` (Lightning's "I trust this checkpoint") allows pickled values."""
        uri = _location(path)
        local = self._local_path(uri)
        if local is not None and os.path.isfile(local):
            raise torchstow.CheckpointNotFoundError(
                f"no torchstow checkpoint at {uri}: it is a single file, as Lightning's own "
                "CheckpointIO writes them (a torchstow checkpoint is a folder); resume from it "
                "without this plugin once, and save on with it"
            )
        trusted = self.allow_pickle or weights_only is False
        checkpoint = torchstow.read(uri, storage_options=self.storage_options, allow_pickle=trusted)
        with self._lock:
            self._resumed[self._key(uri)] = self._commits
        if isinstance(map_location, str | torch.device):  # functions and dicts: left on the CPU
            checkpoint = _to(checkpoint, map_location)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` (nothing there: nothing to do). A symbolic link
        there (``save_last="link"``) is removed itself, never the checkpoint it names."""
        uri = _location(path)
        local = self._local_path(uri)
        if local is not None and os.path.islink(local.rstrip("/")):
            os.unlink(local.rstrip("/"))
            return
        if local is None and _folder(uri) not in self._folders:
            logger.warning(
                "not removing %s: it is outside the folders this run saved checkpoints in (%s); "
                "Lightning asks this off local paths for another run's checkpoint whose "
                "best_model_path it reloaded",
                uri,
                ", ".join(sorted(self._folders)) or "none yet",
            )
            return
        if not self._may_remove(uri):
            return
        try:
            # force: this plugin's saves there have ended; files no manifest names are a killed
            # save's (a preempted run that saved this step again), not a save in flight
            torchstow.delete(uri, storage_options=self.storage_options, force=True)
        except torchstow.CheckpointNotFoundError:
            logger.debug("no checkpoint to remove at %s", uri)

    # -- helpers -----------------------------------------------------------------------

    def _saving(self, path: Any) -> str:
        """The URI of a checkpoint about to be saved at ``path``, its folder noted (off local
        paths, where Lightning does not keep its removals inside its own folder)."""
        uri = _location(path)
        if self._local_path(uri) is None:
            with self._lock:
                self._folders.add(_folder(uri))
        return uri

    def _save_arguments(self, checkpoint: dict[str, Any], extra: Any | None) -> dict[str, Any]:
        """What every save of this plugin passes, blocking or not: this rank alone, replacing a
        committed checkpoint, the trainer's progress as metadata."""
        return {
            "storage_options": self._options(extra),
            "no_dist": True,
            "overwrite": True,
            "allow_pickle": self.allow_pickle,
            "metadata": _metadata(checkpoint),
        }

    def _options(self, extra: Any | None) -> dict[str, Any]:
        if extra is None:
            return self.storage_options
        if not isinstance(extra, dict):
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes storage_options as a dict of torchstow "
                f"storage options, not {type(extra).__name__}"
            )
        return {**self.storage_options, **extra}

    def _local_path(self, uri: str) -> str | None:
        """The local path of ``uri`` (a path, ``file://``, ``shm://``), or None (an object store)."""
        if uri.startswith(_SHM):
            root = self.storage_options.get("shm_dir") or default_shm_dir()
            return os.path.join(root, uri[len(_SHM) :].lstrip("/"))
        if uri.startswith("file://"):
            return uri[len("file://") :]
        return None if "://" in uri else uri

    def _key(self, uri: str) -> str:
        """``uri`` spelled one way, so a checkpoint Lightning names as a local path (shm://
        resolved through fsspec, say) and as a URI compares equal."""
        path = self._local_path(uri)
        return os.path.realpath(path) if path is not None else uri.rstrip("/")

    def _newer_committed(self, key: str) -> bool:
        """Whether ``key`` is no checkpoint the run resumed from, or a newer one has committed since."""
        with self._lock:
            loaded_at = self._resumed.get(key)
            return loaded_at is None or self._commits > loaded_at

    def _may_remove(self, uri: str) -> bool:
        if self._newer_committed(self._key(uri)):
            return True
        logger.warning(
            "not removing %s: the run resumed from it and no newer checkpoint has been committed yet", uri
        )
        return False


class AsyncTorchstowCheckpointIO(TorchstowCheckpointIO):
    """:class:`TorchstowCheckpointIO` whose saves run in the background.

    ``save_checkpoint`` returns once the checkpoint is staged (copied), so
    training goes on while it is written; saves commit in call order. A removal
    waits, in the background, for every save asked for before it, and is
    skipped (with a warning) if one of them failed. A failed save is raised by
    the next ``save_checkpoint`` or by ``teardown``, which waits for all of them.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, *, allow_pickle: bool = False) -> None:
        super().__init__(storage_options, allow_pickle=allow_pickle)
        self._saves: list[Any] = []  # AsyncSave handles since the last load, in call order
        self._asked = 0  # saves asked for so far
        self._saved_at: dict[str, int] = {}  # location -> _asked after its latest save
        self._removing = threading.Lock()  # a removal's last look and its deletion, or a new save
        self._removals: list[Future[None]] = []
        self._remover: ThreadPoolExecutor | None = None
        self._reported = 0  # how many of _saves were checked for a failure

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self._raise_failed()
        uri = self._saving(path)
        local = self._local_path(uri)
        if local is not None:  # at once, as a blocking save would: Lightning may link to it next
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        with self._removing, self._lock:  # before it writes there: a removal asked before spares it
            self._asked += 1
            self._saved_at[self._key(uri)] = self._asked
        saving = torchstow.async_save(checkpoint, uri, **self._save_arguments(checkpoint, storage_options))
        with self._lock:
            self._saves.append(saving)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self._wait()
        self._raise_failed()
        with self._lock:
            self._saves, self._reported = [], 0
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        with self._lock:
            before = list(self._saves)
            if self._remover is None:
                self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchstow-lightning")
            self._removals.append(self._remover.submit(self._remove_after, path, before, self._asked))

    def teardown(self) -> None:
        """Wait for every save and removal; raise the first save that failed."""
        self._wait()
        with self._lock:
            remover, self._remover = self._remover, None
        if remover is not None:
            remover.shutdown(wait=True)
        self._raise_failed()

    # -- helpers -----------------------------------------------------------------------

    def _newer_committed(self, key: str) -> bool:
        # Every save in _saves was asked for after the last load.
        with self._lock:
            if key not in self._resumed:
                return True
            return any(s.done() and s.exception() is None for s in self._saves)

    def _remove_after(self, path: Any, saves: list[Any], asked: int) -> None:
        """Remove ``path`` once ``saves`` (those asked for before the removal, ``asked`` in
        all) committed; not if one failed, nor if ``path`` was saved again since."""
        for saving in saves:
            saving.wait()
        failed = [s.exception() for s in saves if s.exception() is not None]
        if failed:
            logger.warning("not removing %s: a checkpoint saved before it failed (%s)", path, failed[0])
            return
        with self._removing:
            with self._lock:
                again = self._saved_at.get(self._key(_location(path)), 0) > asked
            if again:
                logger.warning("not removing %s: a newer checkpoint is saved there since", path)
                return
            TorchstowCheckpointIO.remove_checkpoint(self, path)

    def _wait(self) -> None:
        with self._lock:
            saves = list(self._saves)
            removals, self._removals = self._removals, []
        for saving in saves:
            saving.wait()
        for removal in removals:
            removal.result()

    def _raise_failed(self) -> None:
        """Raise the first failure among the saves that ended since the last check."""
        with self._lock:
            ended = 0
            for saving in self._saves[self._reported :]:
                if not saving.done():
                    break
                ended += 1
            checked = self._saves[self._reported : self._reported + ended]
            self._reported += ended
        for saving in checked:
            error = saving.exception()
            if error is not None:
                raise error


_LAST = re.compile(r"^last(-v\d+)?\.ckpt$")


def last_checkpoint(dirpath: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The URI of the newest committed ``last*.ckpt`` under ``dirpath`` (a ``ModelCheckpoint``'s
    directory), or None: what ``ckpt_path="last"`` means, for URIs where Lightning cannot
    resolve it (fsspec lists ``s3://`` keys without their scheme)."""
    found = torchstow.list_checkpoints(dirpath, storage_options=storage_options)
    last = [info for info in found if _LAST.match(info.uri.rstrip("/").rsplit("/", 1)[-1])]
    return max(last, key=lambda info: info.committed_at or 0.0).uri if last else None


def _folder(uri: str) -> str:
    """The folder (prefix) holding the checkpoint at the URI ``uri``."""
    return uri.rstrip("/").rsplit("/", 1)[0]


def _metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What ``torchstow ls`` and ``list_checkpoints`` show of a Lightning checkpoint."""
    found = {key: checkpoint[key] for key in ("global_step", "epoch") if isinstance(checkpoint.get(key), int)}
    if "global_step" in found:
        found["step"] = found["global_step"]
    return found


def _to(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value
