"""Per-rank checkpoints: the writer and reader the checkpointers are made of.

A :class:`CheckpointWriter` saves this rank's state dict as a complete
torchstow checkpoint at ``<path>/rank-<global rank>`` (:func:`rank_uri`), on
any backend, without talking to other ranks: so it also runs in a writer
process that has no process group. DTensors are written as their local
shard, so a per-rank checkpoint reloads into the same sharding; to reshard
across world sizes use ``torchstow.save``/``load``, the collective protocol.

One write: this rank's data files, the hook's ``pre_commit``, the commit
(this rank's manifest, published atomically), the barrier (once every rank
has committed), the hook's ``post_commit``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchstow.checkpointing.barriers import Barrier
from torchstow.checkpointing.opener import StorageOpener
from torchstow.checkpointing.rank_info import RankInfo
from torchstow.core.dtensors import is_dtensor, local_view
from torchstow.core.planning import DefaultLoadPlanner, DefaultSavePlanner
from torchstow.core.protocol.steps import load_state_dict, save_state_dict
from torchstow.core.storage.forwarding import ForwardingStorageWriter
from torchstow.core.storage.interfaces import StorageWriter, WriteResult
from torchstow.errors import CheckpointNotFoundError, StateDictMismatchError
from torchstow.format.manifest import Metadata, TensorStorageMetadata
from torchstow.format.structure import build_nested, flatten_state_dict, leaf_paths, set_leaf

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "WriterHook",
    "rank_uri",
]

logger = logging.getLogger("torchstow")


def rank_uri(path: str, rank: int) -> str:
    """Where rank ``rank`` keeps its checkpoint under ``path`` (any URI)."""
    return f"{str(path).rstrip('/')}/rank-{rank}"


class WriterHook:
    """Callbacks around a write's commit; override either or both.

    ``pre_commit`` runs after this rank's data is written and before its
    manifest is published (raising there abandons the write); ``post_commit``
    runs after the barrier, so with one it sees every rank committed. Both
    receive the checkpoint's ``path`` and the keyword arguments given to
    ``write``/``save``.
    """

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Before the commit."""

    def post_commit(self, path: str, **kwargs: Any) -> None:
        """After the commit (and the barrier)."""


@dataclass
class CheckpointWriterConfig:
    """How a :class:`CheckpointWriter` writes.

    ``write_barrier_timeout_secs`` is the default timeout of the barriers the
    builders make. ``overwrite`` replaces an existing checkpoint (the old
    one stays valid until the new one commits); ``allow_pickle`` lets
    values that only full pickle can store be saved; ``storage_options``
    go to the backend.
    """

    write_barrier_timeout_secs: float = 600
    overwrite: bool = False
    allow_pickle: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)


class _HookedWriter(ForwardingStorageWriter):
    """A storage writer that runs a callback just before it commits."""

    def __init__(self, inner: StorageWriter, before_commit: Callable[[], None]) -> None:
        super().__init__(inner)
        self.before_commit = before_commit

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.before_commit()
        self.inner.finish(metadata, results)


class CheckpointWriter:
    """Writes this rank's state dicts as per-rank torchstow checkpoints.

    ``barrier`` runs once per write, after the commit; ``commit_hook``'s
    methods run before and after the commit with the path and the caller's
    keyword arguments. A failed write raises the save's CheckpointException
    (its ``failures`` hold the original error) and commits nothing. ``opener``
    opens the storage (default: the installed plugins, with the config's
    ``storage_options``).
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
        self.config = config
        self.rank_info = rank_info
        self.barrier = barrier
        self.commit_hook = commit_hook
        self.opener = opener if opener is not None else StorageOpener(config.storage_options)

    def write(self, path: str, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Write ``state_dict`` as this rank's checkpoint under ``path`` (any URI)."""
        uri = rank_uri(path, self.rank_info.global_rank)
        hook = self.commit_hook
        writer = self.opener.writer(uri, overwrite=self.config.overwrite)
        if hook is not None:
            writer = _HookedWriter(writer, lambda: hook.pre_commit(path, **kwargs))
        save_state_dict(
            local_view(state_dict), writer, planner=DefaultSavePlanner(allow_pickle=self.config.allow_pickle)
        )
        logger.debug("rank %d committed %s", self.rank_info.global_rank, uri)
        if self.barrier is not None:
            self.barrier.execute_barrier()
        if hook is not None:
            hook.post_commit(path, **kwargs)

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
    """Reads this rank's checkpoint under a path written by :class:`CheckpointWriter`.

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
        allow_pickle: bool = False,
    ) -> tuple[dict[str, Any], list[str]]:
        """This rank's state dict from ``path``, and the keys of ``state_dict`` it lacks.

        Without ``state_dict`` the whole checkpoint is read into new CPU
        tensors (moved to ``map_location`` if given). With one, only its
        keys are read, in place: tensors and DTensor shards are filled,
        other values replaced, ``None`` values become new tensors where the
        checkpoint has one; the same state dict comes back. A key the
        checkpoint lacks is returned in the missing list, or raises
        StateDictMismatchError with ``strict``; a dtype or shape mismatch
        always raises it. A missing checkpoint raises CheckpointNotFoundError.
        """
        rank = self.rank_info.global_rank
        uri = rank_uri(path, rank)
        reader = self.opener.reader(uri)
        try:
            metadata = reader.read_metadata()
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"no checkpoint for rank {rank} under {path} (looked for {uri}): {exc}"
            ) from exc
        stored = metadata.state_dict_metadata
        if state_dict is None:
            leaves: dict[str, Any] = dict.fromkeys(stored)
            paths = leaf_paths(metadata.planner_data, stored)
            root: Any = None
        else:
            flat = flatten_state_dict(state_dict)
            leaves, paths, root = flat.leaves, flat.paths, state_dict
        missing = [fqn for fqn in leaves if fqn not in stored]
        if strict and missing:
            raise StateDictMismatchError(
                f"the checkpoint of rank {rank} at {uri} lacks {len(missing)} key(s) of the state dict: "
                f"{', '.join(missing)}",
                missing_keys=missing,
            )
        targets = self._targets(uri, leaves, stored)
        load_state_dict(
            targets,
            reader,
            planner=DefaultLoadPlanner(strict=False, allow_pickle=allow_pickle),
            metadata=metadata,
        )
        device = _target_device(map_location)
        updates = {}
        for fqn, value in targets.items():
            original = leaves[fqn]
            if isinstance(original, torch.Tensor):
                continue  # filled in place
            if device is not None and isinstance(value, torch.Tensor):
                value = value.to(device)
            updates[fqn] = value
        if root is None:
            return build_nested(updates, metadata.planner_data, stored), missing
        for fqn, value in updates.items():
            root = set_leaf(root, paths[fqn], value)
        return root, missing

    @staticmethod
    def _targets(uri: str, leaves: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, Any]:
        """What to load into, by key: the state dict's own tensors (a DTensor's
        local shard), new tensors where it holds None, its other values."""
        targets: dict[str, Any] = {}
        problems = []
        for fqn, value in leaves.items():
            entry = stored.get(fqn)
            if entry is None:
                continue
            if is_dtensor(value):
                value = local_view(value)
            elif value is None and isinstance(entry, TensorStorageMetadata):
                value = torch.empty(entry.size, dtype=entry.properties.dtype)
            problem = DefaultLoadPlanner._mismatch(fqn, value, entry)
            if problem is not None:
                problems.append(problem[0])
            targets[fqn] = value
        if problems:
            raise StateDictMismatchError(
                f"the state dict does not match the checkpoint at {uri}:\n  " + "\n  ".join(problems),
                mismatched=problems,
            )
        return targets
