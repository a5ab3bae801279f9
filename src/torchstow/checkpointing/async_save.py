"""Asynchronous saves: stage now, write and commit on a background thread.

``torchstow.async_save`` stages the state dict through a stager whose
buffers are reused from one save to the next, then hands the staged copy to
the process's single save thread, which runs the ordinary save protocol, so
saves commit in the order they were made. Before staging, a save waits for
the previous save that used the same stager to finish writing, since it is
about to overwrite that save's buffers: with the default stager at most one
save is in flight and memory stays at one staged copy.

Across ranks the protocol's collectives run on a gloo group made for this
purpose, never on the training group, whose stream (and, with gloo, whose
message order) belongs to the training loop.

Each save keeps its :class:`SaveStats`: the staging is timed here, the
protocol's phases as they finish.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch

from torchstow.core.dtensors import local_view
from torchstow.core.futures import as_future, before_pools_stop, failed_future
from torchstow.core.planning import SavePlanner
from torchstow.core.process_local import ProcessLocal
from torchstow.core.protocol.collective import (
    Collective,
    ProcessGroupCollective,
    Timeout,
    lost_contact,
    make_collective,
)
from torchstow.core.protocol.gloo_groups import private_gloo_group
from torchstow.core.protocol.stats import SaveStats
from torchstow.core.protocol.steps import save_state_dict
from torchstow.core.staging.protocol import Stager
from torchstow.core.staging.stager import CheckpointStagerConfig, DefaultStager, StateDictStager
from torchstow.core.storage.interfaces import StorageWriter
from torchstow.core.storage.stand_ins import FailedWriter
from torchstow.errors import CheckpointTimeoutError
from torchstow.format.manifest import Metadata

__all__ = ["AsyncSave", "AsyncSavePipeline", "SaveJob", "SaveStats", "pipeline"]


@dataclass
class SaveJob:
    """What one save writes with: resolved on the caller's thread, used on the save thread."""

    writer: StorageWriter
    planner: SavePlanner
    user_metadata: dict[str, Any]

    def save(
        self, state_dict: Mapping[str, Any], collective: Collective, stats: SaveStats | None
    ) -> Metadata:
        """Run the save protocol on ``state_dict`` with this job's writer, planner and metadata."""
        return save_state_dict(
            state_dict,
            self.writer,
            planner=self.planner,
            collective=collective,
            user_metadata=self.user_metadata,
            stats=stats,
        )


class AsyncSave:
    """A save in progress, as returned by ``torchstow.async_save``."""

    def __init__(
        self, uri: str, staging: Future[Any], commit: Future[Metadata], stats: SaveStats | None = None
    ) -> None:
        self.uri = uri
        self._staging = staging
        self._commit = commit
        self._stats = stats if stats is not None else SaveStats()

    @property
    def stats(self) -> SaveStats:
        """Seconds per phase and bytes of this save on this rank, as far as it has got:
        complete once the save is :meth:`done`, partial while it runs (a copy, taken now)."""
        return self._stats.snapshot()

    def staged(self, timeout: float | None = None) -> None:
        """Block until the state dict may be mutated again (staging is over).

        Raises what staging raised, if it failed (``result`` raises it too).
        """
        self._staging.result(timeout)

    def result(self, timeout: float | None = None) -> Metadata:
        """Block until the checkpoint is committed; its manifest, or the
        :class:`CheckpointException` every rank raised."""
        return self._commit.result(timeout)

    def done(self) -> bool:
        """Whether the save is over (committed or failed)."""
        return self._commit.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's exception once it is over, or None if it committed."""
        return self._commit.exception(timeout)

    def add_done_callback(self, fn: Callable[[AsyncSave], Any]) -> None:
        """Call ``fn(self)`` when the save is over (at once if it already is)."""
        self._commit.add_done_callback(lambda _: fn(self))

    def wait(self) -> None:
        """Block until the save is over, without raising its exception."""
        wait_futures([self._commit])

    def __repr__(self) -> str:
        state = "done" if self.done() else "staged" if self._staging.done() else "staging"
        return f"<AsyncSave {self.uri!r} {state}>"


class AsyncSavePipeline:
    """The process's save thread, default stager and commit groups.

    A commit group that a save's timeout broke (gloo closes it for good) is replaced
    by a new one, which every rank of the group makes at the same call: at each
    async_save, once the previous save of its stager is over, the ranks vote through
    torch.distributed's store (neither the commit group, which may be broken, nor the
    training group, which belongs to the training loop) on whether any of them lost
    contact on it. A rank whose save committed while another's timed out still votes,
    so no rank makes a group the others do not.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="torchstow-async-save")
        self._lock = threading.Lock()
        self._last: weakref.WeakKeyDictionary[Stager, AsyncSave] = weakref.WeakKeyDictionary()
        self._default_stager: DefaultStager | None = None
        self._world: Any = None
        self._groups: dict[tuple[int, ...], Any] = {}
        self._votes: dict[tuple[int, ...], int] = {}  # votes taken on the commit group of these ranks

    def default_stager(self) -> DefaultStager:
        """Stages on the caller's thread, pinned and non-blocking where an accelerator exists."""
        if self._default_stager is None:
            self._default_stager = DefaultStager(CheckpointStagerConfig(use_async_staging=False))
        return self._default_stager

    def commit_collective(
        self, process_group: Any, coordinator_rank: int, no_dist: bool | None, timeout: Timeout | None = None
    ) -> Collective:
        """The collective a save's protocol runs on: single process, or a
        gloo group with the ranks of ``process_group`` (made once, on the
        caller's thread, by every rank of the group); ``timeout`` bounds each
        wait for the other ranks in the save (default: the timeout of
        ``process_group`` itself, as in a synchronous save; torch's default where
        that group has no CPU backend to read it from). The group is made under
        the timeout of ``process_group``, as the group a synchronous save runs on
        was: a rank may reach its first async save later than the save's timeout."""
        base = make_collective(process_group, coordinator_rank, no_dist, timeout)
        if not isinstance(base, ProcessGroupCollective):
            return base
        import torch.distributed as dist

        own = base.group_timeout()
        limit = base.step_timeout()
        group = base.group if base.group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        coordinator = ranks[coordinator_rank]
        commit_group = self._group_for(tuple(sorted(ranks)), own)
        return ProcessGroupCollective(commit_group, dist.get_group_rank(commit_group, coordinator), limit)

    def _group_for(self, ranks: tuple[int, ...], timeout: datetime.timedelta | None) -> Any:
        """The commit group of ``ranks``, made on first use under ``timeout`` (that of the
        group it serves; each collective on it sets the timeout of its own save), and made
        again when a rank of the group lost contact on it (see the class docstring)."""
        import torch.distributed as dist

        if self._world is not dist.group.WORLD:  # torch.distributed was (re)initialized
            self._world = dist.group.WORLD
            self._groups.clear()
            self._votes.clear()
        group = self._groups.get(ranks)
        if group is not None and len(ranks) > 1 and self._lost_anywhere(ranks, group, timeout):
            group = None
        if group is None:
            group = self._groups[ranks] = private_gloo_group(
                ranks, timeout, step="async save", what="the commit group of its async_save"
            )
        return group

    def _lost_anywhere(self, ranks: tuple[int, ...], group: Any, timeout: datetime.timedelta | None) -> bool:
        """Whether any rank of ``ranks`` lost contact on ``group``: every one of them asks
        at the same call, and all get the same answer (a rank that does not come within
        ``timeout`` is a CheckpointTimeoutError on every rank, itself included when it
        comes: the vote is given up, and no rank goes on to make a group alone)."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        number = self._votes.get(ranks, 0)
        self._votes[ranks] = number + 1
        name = hashlib.sha1(",".join(map(str, ranks)).encode(), usedforsecurity=False).hexdigest()
        store = dist.PrefixStore(f"torchstow/async-commit/{name}/", distributed_c10d._get_default_store())
        if lost_contact(group):
            store.add(f"{number}/lost", 1)
        if store.add(f"{number}/arrived", 1) == len(ranks):
            store.set(f"{number}/done", "1")
        error: RuntimeError | None = None
        try:
            store.wait([f"{number}/done"], *([timeout] if timeout is not None else []))
        except RuntimeError as exc:  # torch's DistStoreError
            error = exc
            # Close the vote: adding more than the ranks keeps the count from ever reaching
            # them. The first to close it gives it up unless every rank had come (then it is
            # over and stands), and lets the others go (they fail too, at once if later).
            closed = len(ranks) + 1
            count = store.add(f"{number}/arrived", closed)
            if count // closed == 1 and count % closed < len(ranks):
                store.set(f"{number}/gave-up", "1")
                store.set(f"{number}/done", "1")
            store.wait([f"{number}/done"])
        if store.check([f"{number}/gave-up"]):
            rank = dist.get_rank()
            raise CheckpointTimeoutError(
                f"checkpoint async save: rank {rank} lost contact with its group of {len(ranks)} ranks "
                f"while they agreed on its commit group: a rank died, stalled, or did not call "
                f"async_save within the timeout; every rank of the group fails this call"
                + (f". Transport error: {error}" if error is not None else ""),
                rank=rank,
                step="async save",
            ) from error
        lost = store.add(f"{number}/lost", 0) > 0
        if number and dist.get_rank() == ranks[0]:  # every rank has passed the vote before
            for key in ("lost", "arrived", "done", "gave-up"):
                store.delete_key(f"{number - 1}/{key}")
        return lost

    def submit(
        self,
        state_dict: Mapping[str, Any],
        uri: str,
        prepare: Callable[[], SaveJob],
        *,
        collective: Callable[[], Collective],
        stager: Stager | None = None,
        track_sources: bool = False,
    ) -> AsyncSave:
        """Stage ``state_dict`` and queue its save; see the module docstring.

        ``collective`` makes the collective the save commits on (as :meth:`commit_collective`
        does); it is called once the previous save of the same stager is over, so that a
        commit group that save broke is replaced. What it raises, ``submit`` raises.

        ``track_sources`` has the stager note where staged tensors come from
        (``trust_version_counter``; only torchstow's own stagers can).

        A failure while preparing or staging does not raise here: it makes
        the save fail on every rank, so no rank waits for one that gave up.
        """
        with self._lock:
            if stager is None:
                stager = self.default_stager()
            previous = self._last.get(stager)
            if previous is not None:
                previous.wait()  # it may still be writing from the buffers we are about to fill
            made = collective()
            job: SaveJob | None = None
            stats = SaveStats()
            try:
                job = prepare()
                if track_sources:
                    _track_sources(stager)
                start = time.perf_counter()
                staging = _timed_staging(as_future(stager.stage(state_dict)), stats, start)
            except Exception as exc:
                staging = failed_future(exc)
            commit = self._executor.submit(self._commit, staging, job, made, stats)
            save = AsyncSave(uri, staging, commit, stats)
            self._last[stager] = save
            return save

    def drain(self) -> None:
        """Wait until every save submitted so far is over (committed or failed)."""
        self._executor.submit(lambda: None).result()

    @staticmethod
    def _commit(
        staging: Future[Any], job: SaveJob | None, collective: Collective, stats: SaveStats
    ) -> Metadata:
        try:
            staged = staging.result()
        except Exception as exc:
            return save_state_dict({}, FailedWriter(exc), collective=collective)
        assert job is not None
        return job.save(staged, collective, stats)


def _timed_staging(staging: Future[Any], stats: SaveStats, start: float) -> Future[Any]:
    """``staging``'s outcome, handed on once ``stats`` holds the staging's seconds
    and the staged tensor bytes (so they are there before the protocol starts); a
    cancelled staging is handed on as a failure, never left waiting."""
    timed: Future[Any] = Future()

    def record(done: Future[Any]) -> None:
        stats.record("stage", time.perf_counter() - start)
        if done.cancelled():  # fails this save on every rank, as a staging error does
            timed.set_exception(RuntimeError("the stager cancelled the staging of this save"))
            return
        error = done.exception()
        if error is not None:
            timed.set_exception(error)
            return
        staged = done.result()
        try:
            stats.bytes_staged = _tensor_bytes(staged)
        finally:
            timed.set_result(staged)

    staging.add_done_callback(record)
    return timed


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors (the local shards of DTensors) in a nested state dict."""
    if isinstance(value, torch.Tensor):
        return int(local_view(value).nbytes)
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _track_sources(stager: Stager) -> None:
    inner = stager.state_dict_stager if isinstance(stager, DefaultStager) else stager
    if isinstance(inner, StateDictStager):
        inner.track_sources = True


_PIPELINE = ProcessLocal(AsyncSavePipeline)


def _finish_before_shutdown() -> None:
    """Let the saves queued on this process's save thread finish before the interpreter
    shuts thread pools down: from then on ``concurrent.futures`` refuses new work, so a
    save still writing (its writer starts threads) would fail, unseen by anyone."""
    saves = _PIPELINE.peek()  # none in a forked child that made no pipeline of its own
    if saves is not None:
        saves.drain()


before_pools_stop(_finish_before_shutdown)


def pipeline() -> AsyncSavePipeline:
    """The process's :class:`AsyncSavePipeline`, made on first use."""
    return _PIPELINE.get()
