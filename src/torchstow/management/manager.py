"""``CheckpointManager``: save, restore and prune for a training loop."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torchstow.api import async_save, collective_of, load, save
from torchstow.checkpointing.async_save import AsyncSave
from torchstow.core.protocol.collective import Collective, make_collective
from torchstow.core.protocol.steps import broadcast_from_coordinator
from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import CheckpointNotFoundError
from torchstow.format.compression import check_compression
from torchstow.management.bases import check_step, choose_base
from torchstow.management.catalog import info, list_steps
from torchstow.management.prune import plan_prune, prune_after_commit
from torchstow.management.steps import check_step_number, step_uri
from torchstow.management.tiered import StepInfo, TieredManager, TieredSave
from torchstow.plugins.resolve import backend_at, checkpoint_uri

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def _check_links(root: str, storage_options: dict[str, Any] | None) -> None:
    """Raise ValueError unless checkpoints under ``root`` can share files (incremental saves)."""
    text, backend = backend_at(root, storage_options)
    if not isinstance(backend, StoreBackend) or not backend.open_store(text).can_adopt():
        raise ValueError(
            f"incremental=True: checkpoints under {root!r} cannot share files (object stores "
            "cannot), so incremental saves are not supported there; use local files or shm://"
        )


class CheckpointManager:
    """Checkpoints of one run under ``uri`` (a directory or prefix, kept as ``.root``),
    one ``<root>/step-<step>`` per save.

    After each save commits, its own steps (``<root>/step-<n>``; other
    checkpoints under ``root`` are neither counted nor deleted) are pruned with
    ``keep_last`` and ``keep_every`` (as :func:`torchstow.prune`; no pruning
    when both are None) by the save's coordinator alone: rank ``coordinator_rank`` (0 by
    default) of its ``process_group`` (``process_group`` here, or the one
    passed to ``save``; the world by default). A failed or interrupted save
    prunes nothing; a pruning failure is logged as a warning by the
    coordinator, never raised (the save committed on every rank).

    ``save`` of a step this manager already committed or restored saves
    nothing (it logs a warning and returns None), so a loop that resumes at
    the restored step goes on; ``overwrite=True`` replaces it. Any other
    checkpoint already at ``<root>/step-<step>`` is a CheckpointExistsError.
    So is a save of a step older than a committed step under ``root`` (a run
    that restored an older step), ``overwrite`` or not, on every rank and
    before anything is written: pruning keeps the newest steps, so it would
    delete the new one (and a restore would load the abandoned newer one).
    Delete the newer steps (:func:`torchstow.delete`) or save under a higher
    step. The coordinator lists ``root`` for this at the first save after the
    manager is made or restores, and when a step is not above the last saved.

    With ``incremental=True`` every save after the first is incremental
    (``save(..., base=)``) on the newest committed step, which pruning always
    keeps (as it keeps the step just saved): tensors unchanged since then are
    shared with it instead of written (local files and ``shm://`` only; see docs/performance.md). A base that
    was deleted or damaged since, or is in DCP's format, is passed over for
    the newest intact torchstow step before the one saved, else the save is a
    full one (logged). The save's coordinator chooses the base for every rank
    (:mod:`torchstow.management.bases`).

    With ``process_group``, ``steps`` and ``latest_step`` are collective (every
    rank of the group gets its rank 0's listing); without, they list on the
    calling rank alone.

    With ``fast`` (a URI on any byte-store backend; ``{node}`` becomes this
    host's node index) the manager is tiered (see docs/tiered.md): ``save``
    returns a :class:`~torchstow.management.tiered.TieredSave` once the state
    is staged; every step goes to the node-local fast tier (its newest
    ``fast_keep`` steps kept), is copied to ``replicas`` other nodes over the
    process group, and every ``persist_every`` steps to ``root`` in the
    background; ``restore`` reads each part from the fastest tier holding it;
    ``steps`` lists :class:`~torchstow.management.tiered.StepInfo`. Every rank
    constructs it and calls ``save``, ``restore``, ``steps`` and ``latest_step``.

    ``compression="zstd"`` compresses every save (as ``save(..., compression=)``;
    not with ``fast``); a save's own ``compression=`` keyword overrides it.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        storage_options: dict[str, Any] | None = None,
        incremental: bool = False,
        process_group: Any = None,
        fast: str | os.PathLike[str] | None = None,
        fast_keep: int = 2,
        replicas: int = 1,
        persist_every: int = 1,
        fast_storage_options: dict[str, Any] | None = None,
        compression: str | None = None,
    ) -> None:
        self.compression = check_compression(compression)
        if fast is not None and compression is not None:
            raise ValueError("compression= is not supported by a tiered manager (fast=): save without it")
        self.root = checkpoint_uri(uri).rstrip("/") or "/"  # "" is an error, not "/"
        self._tiered: TieredManager | None = None
        if fast is not None:
            if incremental:
                _check_links(self.root, storage_options)
            self._tiered = TieredManager(
                self.root,
                os.fspath(fast),
                fast_keep=fast_keep,
                replicas=replicas,
                persist_every=persist_every,
                keep_last=keep_last,
                keep_every=keep_every,
                incremental=incremental,
                storage_options=storage_options,
                fast_storage_options=fast_storage_options,
                process_group=process_group,
            )
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.storage_options = storage_options
        self.incremental = incremental
        self.process_group = process_group
        if incremental:
            _check_links(self.root, storage_options)
        self._newest: int | None = None  # the highest step this manager committed (pruning keeps it)
        # No committed step under the root is newer than this one (None: list the root at the
        # next save); the same on every rank, as every rank makes the same calls.
        self._checked: int | None = None
        self._done: set[int] = set()  # the steps this manager committed or restored (on every rank alike)
        self._pending: tuple[AsyncSave, threading.Event] | None = None
        self._lock = threading.Lock()
        if keep_last is not None or keep_every is not None:
            plan_prune([], keep_last=keep_last or 0, keep_every=keep_every)  # validates both

    def uri(self, step: int) -> str:
        """Where the checkpoint of ``step`` lives."""
        return step_uri(self.root, step)

    def _collective(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with this manager's process group unless they name one."""
        if self.process_group is not None:
            options.setdefault("process_group", self.process_group)
        return options

    def _committed(self, step: int, coordinator: bool) -> None:
        """After ``step`` committed: note it, and prune on the coordinator
        (:func:`~torchstow.management.prune.prune_after_commit`: a failure is a warning)."""
        self._newest = step if self._newest is None else max(self._newest, step)
        self._done.add(step)
        if coordinator:
            with self._lock:
                prune_after_commit(self, step)

    def _base(self, step: int, collective: Collective) -> str | None:
        """The URI of the checkpoint to save ``step`` against, or None (a full save): the
        coordinator's choice, the same on every rank (:func:`~torchstow.management.bases.choose_base`)."""
        return choose_base(
            collective, self.root, step, self.storage_options, listed=self._durable_steps, newest=self._newest
        )

    def save(
        self,
        step: int,
        state_dict: Mapping[str, Any],
        *,
        metadata: Mapping[str, Any] | None = None,
        asynchronous: bool = False,
        **save_options: Any,
    ) -> AsyncSave | TieredSave | None:
        """Save ``state_dict`` as ``step`` (stored in the user metadata as ``step`` too), then prune.

        ``asynchronous=True`` stages and returns an :class:`AsyncSave` at once;
        pruning runs when it commits. A previous asynchronous save is waited
        for first (its failure is raised here). A step this manager already
        committed or restored is not saved again (returns None) unless
        ``overwrite=True``. Other keywords go to :func:`torchstow.save`
        (e.g. ``trust_version_counter=True`` with ``incremental``, ``process_group``).
        """
        if self._tiered is not None:
            if save_options or asynchronous:
                raise TypeError(f"a tiered manager's save takes only metadata=, not {sorted(save_options)}")
            return self._tiered.save(step, state_dict, metadata=metadata)
        check_step_number(step)
        self.wait()
        if step in self._done and not save_options.get("overwrite"):
            logger.warning(
                "step %d is already committed at %s (saved or restored by this manager): not saved "
                "again; pass overwrite=True to replace it",
                step,
                self.uri(step),
            )
            return None
        user_metadata = {**(metadata or {}), "step": step}
        options = self._collective(
            {"storage_options": self.storage_options, "metadata": user_metadata, **save_options}
        )
        collective = collective_of(options)
        coordinator = collective.is_coordinator
        choose = self.incremental and "base" not in options
        if self._checked is None or step < self._checked:
            # one broadcast both refuses a step older than the root's newest and picks the base
            listed, base = check_step(
                collective,
                self.root,
                step,
                self.storage_options,
                listed=self._durable_steps,
                base=choose,
                newest=self._newest,
            )
            self._checked = step if listed else None
            if choose:
                options["base"] = base
        else:
            self._checked = step
            if choose:
                options["base"] = self._base(step, collective)
        if self.compression is not None:
            options.setdefault("compression", self.compression)
        if not asynchronous:
            save(state_dict, self.uri(step), **options)
            self._committed(step, coordinator)
            return None
        pending = async_save(state_dict, self.uri(step), **options)
        pruned = threading.Event()
        self._pending = (pending, pruned)

        def after_commit(done: AsyncSave) -> None:
            try:
                if done.exception() is None:
                    self._committed(step, coordinator)
            finally:
                pruned.set()

        pending.add_done_callback(after_commit)
        return pending

    def wait(self, level: str = "durable") -> None:
        """Wait for the pending asynchronous save (raising its failure) and its pruning;
        tiered, until every pending save reached ``level``."""
        if self._tiered is not None:
            self._tiered.wait(level)
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            save, pruned = pending
            try:
                save.result()
            finally:
                pruned.wait()

    def steps(self) -> list[int] | list[StepInfo]:
        """The steps of the committed checkpoints under ``root``, ascending; tiered, the
        :class:`StepInfo` of each step complete in some tier.

        With this manager's ``process_group``, collective: every rank of the group calls it
        and gets the listing of the group's rank 0, so ranks agree. Without one, it lists
        on the calling rank alone (ranks whose listings differ may disagree)."""
        if self._tiered is not None:
            return self._tiered.steps()
        return self._agreed("manager: steps", self._durable_steps)

    def latest_step(self) -> int | None:
        """The newest committed step, or None (collective as :meth:`steps`)."""
        if self._tiered is not None:
            return self._tiered.latest_step()
        return self._agreed("manager: latest step", self._listed_latest)

    def _agreed(self, what: str, listing: Callable[[], _T]) -> _T:
        """``listing()`` on this rank; with this manager's process group, the group's rank 0's."""
        if self.process_group is None:
            return listing()
        found: _T = broadcast_from_coordinator(make_collective(self.process_group), what, listing)
        return found

    def _durable_steps(self) -> list[int]:
        found = list_steps(self.root, storage_options=self.storage_options)
        return sorted({info.step for info in found if info.step is not None})

    def _listed_latest(self) -> int | None:
        newest = self._newest_listed()
        return None if newest is None else newest[0]

    def _newest_listed(self) -> tuple[int, str] | None:
        """The newest committed step under ``root`` and where it lies: ``uri(step)`` when
        that is among the checkpoints of the step, else the newest of them (``iter_0000007``)."""
        found = [
            (info.step, info.uri)
            for info in list_steps(self.root, storage_options=self.storage_options)
            if info.step is not None
        ]
        if not found:
            return None
        step = max(s for s, _ in found)
        uris = [uri for s, uri in found if s == step]
        return step, self.uri(step) if self.uri(step) in uris else uris[-1]

    def _step_listed(self, step: int) -> str:
        """Where ``step`` lies: ``uri(step)`` when something is there, else the newest
        checkpoint of ``step`` under ``root`` (``iter_0000007``), else ``uri(step)``."""
        try:
            info(self.uri(step), storage_options=self.storage_options)
            return self.uri(step)
        except CheckpointNotFoundError:
            pass
        found = [i.uri for i in list_steps(self.root, storage_options=self.storage_options) if i.step == step]
        return found[-1] if found else self.uri(step)

    def restore(self, state_dict: Mapping[str, Any], step: int | None = None, **load_options: Any) -> int:
        """Load the checkpoint of ``step`` (default: the newest) into ``state_dict``; returns the step.

        The step is looked for at ``uri(step)``, else under another name (``iter_0000007``),
        as :meth:`steps` counts it; the coordinator decides where, for every rank.

        A loop resumes after it: the restored step's state is saved already.
        """
        if step is not None:
            check_step_number(step)
        if self._tiered is not None:
            if load_options:
                raise TypeError(f"a tiered manager's restore takes no options, got {sorted(load_options)}")
            return self._tiered.restore(state_dict, step)
        self.wait()
        options = self._collective({"storage_options": self.storage_options, **load_options})
        if step is not None:
            # where the coordinator finds it, for every rank: <root>/step-<step>, or a
            # checkpoint of that step under another name (iter_0000007), as steps() counts it
            given = step
            uri = broadcast_from_coordinator(
                collective_of(options), "restore: where the step lies", lambda: self._step_listed(given)
            )
        else:
            # The coordinator's listing decides: ranks whose listings differ (one lags, or
            # fails) would otherwise load different steps, or leave the others waiting.
            newest = broadcast_from_coordinator(
                collective_of(options), "restore: newest step", self._newest_listed
            )
            if newest is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.root}")
            step, uri = newest
        load(state_dict, uri, **options)
        self._done.add(step)
        self._checked = None  # the next save may be older than steps under the root
        return step

    def close(self) -> None:
        """Wait for the pending save and its pruning."""
        if self._tiered is not None:
            self._tiered.close()
            return
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
