"""``CheckpointManager``: save, restore and prune for a training loop."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from torchstow.checkpointing.async_save import AsyncSave
from torchstow.errors import CheckpointNotFoundError
from torchstow.management.prune import prune

__all__ = ["CheckpointManager"]

logger = logging.getLogger("torchstow")


def _is_coordinator() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_links(root: str, storage_options: dict[str, Any] | None) -> None:
    """Raise ValueError unless checkpoints under ``root`` can share files (incremental saves)."""
    from torchstow.core.storage.backend import StoreBackend
    from torchstow.core.storage.store import ByteStore
    from torchstow.plugins.manager import default_registry

    backend = default_registry().backend_for(root, storage_options)
    if not isinstance(backend, StoreBackend) or type(backend.open_store(root)).adopt is ByteStore.adopt:
        raise ValueError(
            f"incremental=True: checkpoints under {root!r} cannot share files (object stores "
            "cannot), so incremental saves are not supported there; use local files or shm://"
        )


class CheckpointManager:
    """Checkpoints of one run under ``root``, one ``<root>/step-<step>`` per save.

    After each save commits, checkpoints are pruned with ``keep_last`` and
    ``keep_every`` (as :func:`torchstow.prune`; no pruning when both are
    None), on the coordinator only when torch.distributed is initialized.
    A failed or interrupted save prunes nothing.

    With ``incremental=True`` every save after the first is incremental
    (``save(..., base=)``) on the newest committed step, which pruning always
    keeps: tensors unchanged since then are shared with it instead of written
    (local files and ``shm://`` only; see docs/performance.md).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        storage_options: dict[str, Any] | None = None,
        incremental: bool = False,
    ) -> None:
        self.root = os.fspath(root).rstrip("/") or "/"
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.storage_options = storage_options
        self.incremental = incremental
        if incremental:
            _check_links(self.root, storage_options)
        self._newest: int | None = None  # the highest step this manager committed (pruning keeps it)
        self._pending: tuple[AsyncSave, threading.Event] | None = None
        self._prune_error: BaseException | None = None
        self._lock = threading.Lock()
        if keep_last is not None or keep_every is not None:
            from torchstow.management.prune import plan_prune

            plan_prune([], keep_last=keep_last or 0, keep_every=keep_every)  # validates both

    def uri(self, step: int) -> str:
        """Where the checkpoint of ``step`` lives."""
        return f"{self.root}/step-{step}"

    def _prune(self) -> None:
        if (self.keep_last is None and self.keep_every is None) or not _is_coordinator():
            return
        with self._lock:
            prune(
                self.root,
                keep_last=self.keep_last or 0,
                keep_every=self.keep_every,
                storage_options=self.storage_options,
            )

    def save(
        self,
        step: int,
        state_dict: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        asynchronous: bool = False,
        **save_options: Any,
    ) -> AsyncSave | None:
        """Save ``state_dict`` as ``step`` (stored in the user metadata as ``step`` too), then prune.

        ``asynchronous=True`` stages and returns an :class:`AsyncSave` at once;
        pruning runs when it commits. A previous asynchronous save is waited
        for first (its failure is raised here). Other keywords go to
        :func:`torchstow.save` (e.g. ``trust_version_counter=True`` with ``incremental``).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        from torchstow.api import async_save, save

        self.wait()
        user_metadata = {**(metadata or {}), "step": step}
        options = {"storage_options": self.storage_options, "metadata": user_metadata, **save_options}
        if self.incremental and "base" not in options:
            newest = self._newest if self._newest is not None else self.latest_step()
            if newest is not None and newest != step:
                options["base"] = self.uri(newest)
        if not asynchronous:
            save(state_dict, self.uri(step), **options)
            self._newest = step if self._newest is None else max(self._newest, step)
            self._prune()
            return None
        pending = async_save(state_dict, self.uri(step), **options)
        pruned = threading.Event()
        self._pending = (pending, pruned)

        def after_commit(done: AsyncSave) -> None:
            try:
                if done.exception() is None:
                    self._newest = step if self._newest is None else max(self._newest, step)
                    self._prune()
            except Exception as exc:
                logger.warning("pruning %s after saving step %d failed: %s", self.root, step, exc)
                self._prune_error = exc
            finally:
                pruned.set()

        pending.add_done_callback(after_commit)
        return pending

    def wait(self) -> None:
        """Wait for the pending asynchronous save (raising its failure) and its pruning."""
        pending, self._pending = self._pending, None
        if pending is not None:
            save, pruned = pending
            try:
                save.result()
            finally:
                pruned.wait()
        error, self._prune_error = self._prune_error, None
        if error is not None:
            raise error

    def steps(self) -> list[int]:
        """The steps of the committed checkpoints under ``root``, ascending."""
        from torchstow.management.catalog import list_checkpoints

        found = list_checkpoints(self.root, storage_options=self.storage_options)
        return sorted({info.step for info in found if info.step is not None})

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, state_dict: Mapping[str, Any], step: int | None = None, **load_options: Any) -> int:
        """Load the checkpoint of ``step`` (default: the newest) into ``state_dict``; returns the step."""
        from torchstow.api import load

        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.root}")
        load(state_dict, self.uri(step), storage_options=self.storage_options, **load_options)
        return step

    def close(self) -> None:
        """Wait for the pending save and its pruning."""
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
