"""The writer and reader the checkpointers are made of.

Every rank's :class:`CheckpointWriter` writes its state dict into *one*
ordinary torchstow checkpoint at ``path``: its DTensor shards, replicated
values once, one manifest covering every rank. The writers run the usual
save protocol without a process group (a writer process has none): its
messages travel as small files in the checkpoint's store, ordered by the
checkpointer's barrier (:mod:`torchstow.checkpointing.barrier_collective`).

One write, on every rank: local plan -> (barrier) the coordinator's global
plan -> (barrier) this rank's data files, then the hook's ``pre_commit`` ->
(barrier) the coordinator checks every rank's outcome and publishes the
manifest atomically -> (barrier) every rank learns the outcome -> the
hook's ``post_commit``. A world of one has nobody to exchange with: its
data, ``pre_commit``, one barrier, the commit, ``post_commit``.
:class:`CheckpointReader` reads any torchstow checkpoint, this rank's
DTensor shards resharded as needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchstow.checkpointing.barrier_collective import BarrierCollective
from torchstow.checkpointing.barriers import Barrier
from torchstow.checkpointing.opener import StorageOpener
from torchstow.checkpointing.partial_read import plan_partial_read, subtree
from torchstow.checkpointing.rank_info import RankInfo
from torchstow.core.futures import completed_future, wait_future
from torchstow.core.layout.writer import LayoutWriter, set_format_version
from torchstow.core.planning import DefaultLoadPlanner, DefaultSavePlanner, SavePlan, SavePlanner
from torchstow.core.planning.mismatch import mismatch_message
from torchstow.core.protocol.collective import Collective, SingleProcess
from torchstow.core.protocol.materialize import materialize
from torchstow.core.protocol.steps import save_state_dict
from torchstow.core.storage.forwarding import ForwardingStorageWriter
from torchstow.core.storage.interfaces import StorageWriter
from torchstow.core.storage.stand_ins import FailedWriter
from torchstow.core.storage.store import ByteStore
from torchstow.errors import CheckpointNotFoundError, StateDictMismatchError
from torchstow.format.manifest import FORMAT_VERSION
from torchstow.format.structure import build_nested, set_leaf

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "WriterHook",
]

logger = logging.getLogger(__name__)


class WriterHook:
    """Callbacks around a write's commit; override either or both.

    ``pre_commit`` runs on every rank once its data is written, before the
    manifest is published (raising there abandons the write on every rank);
    ``post_commit`` runs on every rank once the manifest is committed. Both
    receive the checkpoint's ``path`` and the keyword arguments given to
    ``write``/``save``.
    """

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Before the commit."""

    def post_commit(self, path: str, **kwargs: Any) -> None:
        """After the commit."""


@dataclass
class CheckpointWriterConfig:
    """How a :class:`CheckpointWriter` writes.

    ``write_barrier_timeout_secs`` is the default timeout of the barriers the
    builders make. ``overwrite`` replaces an existing checkpoint (the old
    one stays valid until the new one commits); ``allow_pickle`` lets
    values that only full pickle can store be saved; ``storage_options``
    go to the backend; ``format_version`` is the manifest format written
    (as in ``torchstow.save``).
    """

    write_barrier_timeout_secs: float = 600
    overwrite: bool = False
    allow_pickle: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


class _HookedWriter(ForwardingStorageWriter):
    """A storage writer that runs a callback once this rank's data is written."""

    def __init__(self, inner: StorageWriter, after_data: Callable[[], None]) -> None:
        super().__init__(inner)
        self.after_data = after_data

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        results = wait_future(self.inner.write_data(plan, planner))
        self.after_data()
        return completed_future(results)


#: Barrier rounds per write on several ranks: the save protocol's gather, scatter, gather and
#: broadcast (see docs/staging.md). A world of one passes one round per write.
BARRIERS_PER_WRITE = 4


class _OneRound:
    """A world of one's barrier: passed once per write, after the data and ``pre_commit``,
    before the commit (or, when the write fails before that, on the way out)."""

    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier
        self.passed = False

    def pass_once(self) -> None:
        if not self.passed:
            self.passed = True
            self.barrier.execute_barrier()


def _byte_store(writer: StorageWriter) -> ByteStore | None:
    """The byte store under ``writer`` (through any forwarding wrappers), if it has one."""
    while isinstance(writer, ForwardingStorageWriter):
        writer = writer.inner
    return writer.store if isinstance(writer, LayoutWriter) else None


class CheckpointWriter:
    """Writes one torchstow checkpoint at ``path`` together with the other ranks' writers.

    Every rank calls :meth:`write` with its own state dict; the result is one
    ordinary checkpoint (DTensors as their global tensors, replicated values
    stored once) that ``torchstow.load``/``read`` load and reshard. The ranks
    run the ordinary save protocol, talking through small files in the
    checkpoint's store ordered by ``barrier`` (:mod:`torchstow.checkpointing.barrier_collective`),
    so no process group is needed; more than one rank needs a barrier and a
    backend built on a byte store. ``commit_hook``'s ``pre_commit`` runs on
    every rank once its data is written, ``post_commit`` once the manifest is
    committed. A failure on any rank raises the same CheckpointException on
    every rank (its ``failures`` hold the original errors) and commits nothing.
    ``opener`` opens the storage (default: the installed plugins, with the
    config's ``storage_options``).
    """

    def __init__(
        self,
        config: CheckpointWriterConfig,
        rank_info: RankInfo,
        barrier: Barrier | None = None,
        commit_hook: WriterHook | None = None,
        *,
        opener: StorageOpener | None = None,
    ) -> None:
        if barrier is None and rank_info.global_world_size > 1:
            raise ValueError(
                f"a checkpoint writer of {rank_info.global_world_size} ranks needs a barrier to write one "
                "checkpoint together, e.g. CheckpointerConfig(barrier_config=BarrierConfig('tcp_store', "
                "{'tcpstore_port': ...}))"
            )
        self.config = config
        self.rank_info = rank_info
        self.barrier = barrier
        self.commit_hook = commit_hook
        self.opener = opener if opener is not None else StorageOpener(config.storage_options)
        self._writes = 0

    def write(self, path: str, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Write ``state_dict``, this rank's part of the checkpoint at ``path`` (any URI)."""
        self._write(path, state_dict, None, kwargs)

    def write_failed(self, path: str, error: BaseException) -> None:
        """Take part in the write at ``path`` as a rank whose state never reached it (its
        staging or packing raised ``error``): the protocol's first step fails, so every rank
        raises the same CheckpointException naming ``error`` at once, nothing is committed,
        and the barrier stays in step for the next write."""
        self._write(path, {}, error, {})

    def _write(
        self, path: str, state_dict: Mapping[str, Any], error: BaseException | None, kwargs: dict[str, Any]
    ) -> None:
        self._writes += 1
        if self.barrier is not None:
            self.barrier.start_write()
        hook = self.commit_hook
        solo = _OneRound(self.barrier) if self.barrier is not None and self._alone else None
        try:
            writer = self.opener.writer(str(path), overwrite=self.config.overwrite)
            set_format_version(writer, self.config.format_version)
            collective = self._collective(writer, path)
        except Exception:
            if solo is not None:
                solo.pass_once()
            elif self.barrier is not None:  # take no part, but pass every round: the others see why
                self._exchange(None).drain(BARRIERS_PER_WRITE)
            raise

        def after_data() -> None:
            try:
                if hook is not None:
                    hook.pre_commit(path, **kwargs)
            finally:
                if solo is not None:
                    solo.pass_once()

        if error is not None:  # over the real store's exchange, the stand-in fails the first step
            writer = FailedWriter(error)
        elif hook is not None or solo is not None:
            writer = _HookedWriter(writer, after_data)
        planner = DefaultSavePlanner(allow_pickle=self.config.allow_pickle)
        try:
            save_state_dict(state_dict, writer, planner=planner, collective=collective)
        except Exception:
            if solo is not None:
                solo.pass_once()
            elif isinstance(collective, BarrierCollective):
                collective.drain(BARRIERS_PER_WRITE)  # the other ranks count on every round
            raise
        logger.debug("rank %d: checkpoint %s committed", self.rank_info.global_rank, path)
        if hook is not None:
            hook.post_commit(path, **kwargs)

    @property
    def _alone(self) -> bool:
        return self.rank_info.global_world_size == 1

    def _collective(self, writer: StorageWriter, path: str) -> Collective:
        if self.barrier is None or self._alone:
            return SingleProcess()
        store = _byte_store(writer)
        if store is None:
            raise ValueError(
                f"{path}: the checkpointer writes one checkpoint from several ranks through the files of a "
                f"byte-store backend, and this backend's writer ({type(writer).__name__}) has none"
            )
        return self._exchange(store)

    def _exchange(self, store: ByteStore | None) -> BarrierCollective:
        assert self.barrier is not None
        return BarrierCollective(
            store,  # type: ignore[arg-type]  # None: a rank that only drains
            self.barrier,
            self.rank_info.global_rank,
            self.rank_info.global_world_size,
            write_id=f"w{self._writes}",
        )

    def close(self) -> None:
        """Release the writer's resources (it holds none between writes)."""


MapLocation = str | torch.device | Mapping[str, str | torch.device] | None


def _target_device(map_location: MapLocation) -> torch.device | None:
    if map_location is None:
        return None
    if isinstance(map_location, str | torch.device):
        return torch.device(map_location)
    if isinstance(map_location, Mapping):
        target = map_location.get("cpu")
        return None if target is None else torch.device(target)
    raise TypeError(
        f"map_location must be a device, a device name, or a dict like {{'cpu': 'cuda:0'}}; "
        f"got {type(map_location).__name__}"
    )


class CheckpointReader:
    """Reads a checkpoint written by :class:`CheckpointWriter` (or any torchstow checkpoint) for this rank.

    ``opener`` opens the storage (default: the installed plugins, with ``storage_options``).
    """

    def __init__(
        self,
        rank_info: RankInfo,
        *,
        storage_options: dict[str, Any] | None = None,
        opener: StorageOpener | None = None,
    ) -> None:
        self.rank_info = rank_info
        self.opener = opener if opener is not None else StorageOpener(dict(storage_options or {}))

    def read(
        self,
        path: str,
        state_dict: Mapping[str, Any] | None = None,
        *,
        map_location: MapLocation = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], list[str]]:
        """The state dict read from the checkpoint at ``path``, and the keys of ``state_dict`` it lacks.

        Without ``state_dict`` the whole checkpoint is read into new CPU
        tensors (moved to ``map_location`` if given). With one, only its
        keys are read, in place: tensors and DTensor shards are filled (a
        DTensor gets its shard of the stored global tensor, whatever the
        sharding it was saved with), other values replaced, and a ``None``
        at any depth is replaced by what the checkpoint holds there, a value
        or a whole subtree; the same state dict comes back. Keys the
        checkpoint lacks are returned as PyTorch's reader names them, or
        raise StateDictMismatchError with ``strict``; a dtype or shape
        mismatch always raises it. A missing checkpoint raises
        CheckpointNotFoundError. ``kwargs``: ``allow_pickle`` (read values
        only full pickle can restore), ``weights_only=False`` (the same, as
        ``torch.load`` spells it), ``storage_options`` (for this read); any
        other keyword (``mmap``, ``torch.load``'s own) is accepted and, as
        PyTorch's reader does with them, changes nothing.
        """
        allow_pickle, options = _read_options(kwargs)
        rank = self.rank_info.global_rank
        opener = self.opener
        if options:  # storage_options for this read, over the reader's own
            opener = StorageOpener({**opener.storage_options, **options})
        reader = opener.reader(str(path))
        try:
            metadata = reader.read_metadata()
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(f"rank {rank} found no checkpoint at {path}: {exc}") from exc
        stored = metadata.state_dict_metadata
        whole = state_dict is None
        wanted = plan_partial_read({} if state_dict is None else state_dict, stored, metadata.planner_data)
        if whole:
            wanted.leaves = dict.fromkeys(stored)
        if strict and wanted.missing:
            unexpected = [key for key in stored if key not in wanted.leaves]
            raise StateDictMismatchError(
                mismatch_message(
                    f"the state dict does not match the checkpoint at {path}:",
                    missing=wanted.missing,
                    unexpected=unexpected,
                ),
                missing_keys=wanted.missing,
                unexpected_keys=unexpected,
            )
        _check_targets(str(path), wanted.leaves, stored)
        targets = materialize(reader, metadata, wanted.leaves, allow_pickle=allow_pickle)
        device = _target_device(map_location)
        values = {}
        for fqn, value in targets.items():
            if isinstance(wanted.leaves[fqn], torch.Tensor):
                continue  # filled in place
            if device is not None and isinstance(value, torch.Tensor):
                value = value.to(device)
            values[fqn] = value
        if whole:
            return build_nested(values, metadata.planner_data, stored), []
        root: Any = state_dict
        for fqn, value in values.items():
            if fqn in wanted.paths:
                root = set_leaf(root, wanted.paths[fqn], value)
        for fqn, under in wanted.subtrees.items():
            path_in = wanted.paths[fqn]
            root = set_leaf(root, path_in, subtree(values, under, metadata.planner_data, path_in))
        return root, wanted.missing


def _check_targets(uri: str, leaves: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
    """Raise StateDictMismatchError naming every value of the state dict that cannot take
    what the checkpoint stores for its key (a None is read into a new value, which can)."""
    problems = []
    for fqn, value in leaves.items():
        problem = None if value is None else DefaultLoadPlanner._mismatch(fqn, value, stored[fqn])
        if problem is not None:
            problems.append(problem[0])
    if problems:
        raise StateDictMismatchError(
            mismatch_message(f"the state dict does not match the checkpoint at {uri}:", problems=problems),
            mismatched=problems,
        )


def _read_options(kwargs: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """``(allow_pickle, storage_options)`` from :meth:`CheckpointReader.read`'s keyword arguments.

    Other keywords (``torch.load``'s, which PyTorch's reader takes and passes
    on) are accepted and, as there, have no effect on the result.
    """
    ignored = sorted(set(kwargs) - {"allow_pickle", "weights_only", "storage_options"})
    if ignored:
        logger.debug("CheckpointReader.read(): keyword(s) with no effect here: %s", ", ".join(ignored))
    allow_pickle = bool(kwargs.get("allow_pickle", False)) or kwargs.get("weights_only") is False
    return allow_pickle, dict(kwargs.get("storage_options") or {})
