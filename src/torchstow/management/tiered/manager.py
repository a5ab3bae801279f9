"""The tiered checkpoint manager: every step in the node-local fast tier, durable later.

A step is an ordinary torchstow checkpoint ``<tier>/step-<step>`` in each tier:

- **fast**: every rank writes its part (the ordinary save protocol over a
  private gloo group, each rank's writer on its own node's fast tier); the
  coordinator commits the manifest, then every node's first rank publishes the
  same manifest in its node's fast tier. A node's copy holds the manifest and
  the data files of its ranks (plus the replicas it keeps);
- **replicated**: each rank sends its data files over the process group to a
  rank on each of the next ``replicas`` nodes, which writes them into its own
  node's copy of the step (file names carry the save's id: they never clash);
- **durable**: on a persist step every rank copies its own files from its
  node's fast tier to ``<root>/step-<step>`` (checking every block on the way)
  and the coordinator publishes the manifest there last, on a thread and a gloo
  group of their own.

A restore inventories every node's fast tier, chooses the newest step whose
every data file some node holds intact (checksums), reads each file from this
node, else from a node holding it (which sends it), else from the root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from torchstow.core.dtensors import local_view
from torchstow.core.futures import before_pools_stop
from torchstow.core.layout.commit import committed_manifest, is_committed, manifest_files, publish_manifest
from torchstow.core.layout.location import manifest_bytes
from torchstow.core.layout.reader import LayoutReader
from torchstow.core.layout.views import tensor_bytes
from torchstow.core.layout.writer import LayoutWriter
from torchstow.core.planning import DefaultLoadPlanner, SavePlan, SavePlanner
from torchstow.core.process_local import ProcessLocal
from torchstow.core.protocol.collective import Collective, ProcessGroupCollective, SingleProcess
from torchstow.core.protocol.gloo_groups import private_gloo_group
from torchstow.core.protocol.steps import (
    _SaveProgress,
    _write_and_commit,
    all_reduce,
    broadcast_from_coordinator,
    load_state_dict,
    save_state_dict,
)
from torchstow.core.staging.stager import StateDictStager
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.interfaces import StorageWriter
from torchstow.core.storage.stand_ins import FailedWriter
from torchstow.core.storage.store import ByteStore, read_capped
from torchstow.errors import (
    CheckpointException,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    ChecksumMismatchError,
    CorruptCheckpointError,
)
from torchstow.format.codec import ReadFile, decode_metadata, peek_manifest
from torchstow.format.files import CHUNK_TABLE_MAX_BYTES, MANIFEST, is_data_file
from torchstow.format.manifest import Metadata
from torchstow.management.bases import check_step, choose_base
from torchstow.management.datafiles import FileSpans, scan_file, spans_by_file
from torchstow.management.steps import check_step_number, step_uri
from torchstow.management.tiered.handle import StepInfo, TieredSave
from torchstow.management.tiered.holdings import Choice, Held, complete_steps, fast_steps, inventory
from torchstow.management.tiered.nodes import Topology, expand_node, node_index
from torchstow.management.tiered.sources import TieredSources
from torchstow.management.tiered.transfer import Transfer, run_transfers

__all__ = ["FAST_TIER_KEY", "TieredManager"]

#: The user-metadata key recording the fast tier's URI (``{node}`` unexpanded) in every step.
FAST_TIER_KEY = "fast_tier"

#: The file in each node's fast tier naming the root of the run it belongs to.
OWNER = "torchstow-tier.json"
_OWNER_MAX_BYTES = 1 << 20  # {"root": <a path or URI>}

logger = logging.getLogger("torchstow.management")


class _FilesWriter(LayoutWriter):
    """A layout writer on one node's fast tier that notes the data files (and bytes) this rank wrote.

    The coordinator commits a manifest naming the files of every node, while its own
    store holds only its node's: the layout writer's check that every listed file is
    in the committing store does not apply (a restore checks every file it uses).
    """

    files: dict[str, int]

    def _check_listed(self, locations: Mapping[Any, Any]) -> None:
        pass

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        future = super().write_data(plan, planner)
        self.files = {}
        for result in future.result():
            name = result.storage_data.relative_path
            self.files[name] = self.files.get(name, 0) + result.storage_data.length
        return future


class _RootCopy(LayoutWriter):
    """One rank's part of a persist, as the save protocol's commit-or-abort sees it: the
    files it copies into the root's step, which :meth:`abort` removes (never one a
    manifest committed there lists) only when the commit certainly did not happen, and on
    the coordinator the outcome of publishing the step's manifest (save ``save_id``) there.

    Elsewhere, after a failure, one read of the root's manifest serves both the cleanup
    (the files it names) and :meth:`commit_outcome` (whether it is this save's)."""

    def __init__(self, store: ByteStore, coordinator: bool, save_id: str) -> None:
        super().__init__(store, thread_count=1)
        self._coordinator = coordinator
        self._save_id = save_id
        self._root: tuple[set[str] | None, bool | None] | None = None

    def _read_root(self) -> tuple[set[str] | None, bool | None]:
        """What the root's manifest names (None: unreadable), and True when it is this
        save's (else None: unknown); read once."""
        if self._root is None:
            try:
                found = committed_manifest(self.store)
            except Exception:
                logger.warning("could not read the manifest at %s back", self.store.location, exc_info=True)
                self._root = None, None
            else:
                files = set() if found is None else manifest_files(found)
                self._root = files, True if found is not None and found.save_id == self._save_id else None
        return self._root

    def _listed(self) -> set[str] | None:
        return self._read_root()[0]

    def commit_outcome(self) -> bool | None:
        return super().commit_outcome() if self._coordinator else self._read_root()[1]

    def copy(self, source: ByteStore, files: list[str], spans: dict[str, FileSpans], again: bool) -> int:
        """Copy ``files`` (checking every block); ``again``: a retry that knows no manifest of
        this save is committed replaces what the failed attempt left. Bytes copied."""
        self.store.prepare()
        if again:
            self.store.delete_files(files)
        total = 0
        for name in files:
            self._written.append(name)
            mine = spans.get(name)
            _copy_checked(source, self.store, name, mine)
            total += mine.nbytes if mine is not None else 0
        return total

    def commit(self, metadata: Metadata) -> None:
        """(Coordinator) publish the step's manifest: exclusive, its outcome noted."""
        self._finished = True
        self._publish(metadata)


@dataclass
class _Persist:
    step: int
    metadata: Metadata
    files: list[str]
    handle: TieredSave
    retried: bool = False
    nbytes: int = 0  # copied to the root by this rank


def _given(tables: Mapping[str, bytes]) -> ReadFile:
    """A manifest's files beside it, read already (by name; the size they should have is
    checked by the decoder)."""
    return lambda name, _limit: tables.get(name)


def _all_gather(coll: Collective, step: str, value: Any) -> list[Any]:
    """Every rank's ``value``, on every rank (a failure on any rank raises on every rank)."""
    return all_reduce(coll, step, lambda: value, lambda values: values)


def _store_backend(uri: str, options: dict[str, Any] | None, what: str) -> StoreBackend:
    from torchstow.plugins.manager import default_registry

    backend = default_registry().backend_for(uri, options)
    if not isinstance(backend, StoreBackend):
        raise ValueError(f"the {what} tier {uri!r} must be a byte-store backend (files or objects)")
    return backend


class TieredManager:
    """The tiered side of :class:`~torchstow.CheckpointManager` (``fast=`` given); see there.

    Every rank of ``process_group`` (the world by default) constructs it: it
    makes two private gloo groups and learns which node each rank is on.
    """

    def __init__(
        self,
        root: str,
        fast: str,
        *,
        fast_keep: int = 2,
        replicas: int = 1,
        persist_every: int = 1,
        keep_last: int | None = None,
        keep_every: int | None = None,
        incremental: bool = False,
        storage_options: dict[str, Any] | None = None,
        fast_storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        timeout: float = 600.0,
    ) -> None:
        for name, value, least in (
            ("fast_keep", fast_keep, 1),
            ("replicas", replicas, 0),
            ("persist_every", persist_every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.root = root
        self.node = node_index()
        self.fast_template = fast
        self.fast = expand_node(fast, self.node).rstrip("/")
        from torchstow.interop.convert import same_location

        if same_location(self.fast, root):
            raise ValueError(
                f"the fast tier {fast!r} is the root {root!r}: give the fast tier a location of "
                "its own (its pruning keeps fast_keep steps, and a persist copies a step from it)"
            )
        self.fast_keep = fast_keep
        self.replicas = replicas
        self.persist_every = persist_every
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.incremental = incremental
        self.storage_options = storage_options
        self.timeout = timeout
        self._fast_backend = _store_backend(self.fast, fast_storage_options, "fast")
        self._root_backend = _store_backend(root, storage_options, "durable")
        import torch.distributed as dist

        self._group: Any = None
        self._coll: Collective
        self._persist_coll: Collective
        if dist.is_available() and dist.is_initialized():
            group = process_group if process_group is not None else dist.group.WORLD
            ranks = dist.get_process_group_ranks(group)

            def group() -> Any:
                what = "the groups of a tiered CheckpointManager"
                return private_gloo_group(ranks, timedelta(seconds=timeout), step="tiered", what=what)

            self._group = group()
            self._coll = ProcessGroupCollective(self._group)
            self._persist_coll = ProcessGroupCollective(group())
        else:
            self._coll = self._persist_coll = SingleProcess()
        nodes = _all_gather(self._coll, "tiered: node of each rank", self.node)
        self.topology = Topology(self._coll.rank, tuple(nodes))
        self._take_fast_tier()
        self._stager = StateDictStager()
        self._fast_thread = ThreadPoolExecutor(1, thread_name_prefix="torchstow-tiered-fast")
        self._persist_thread = ThreadPoolExecutor(1, thread_name_prefix="torchstow-tiered-persist")
        self._last_fast: Future[None] | None = None
        self._released = threading.Event()  # set once the last fast phase is done with the buffers
        self._released.set()
        self._last_persist: Future[None] | None = None
        self._handles: list[TieredSave] = []
        self._pinned: set[int] = set()  # fast steps a persist still needs
        self._retry: list[_Persist] = []
        self._lock = threading.Lock()
        self._prune_lock = threading.Lock()
        self._replicated = 0  # the newest step replicated by this manager
        # No committed step under the root is newer than this one (None: list the root at the
        # next save); written by save, and by the fast phase when its check fails (the next
        # save waits for that phase to release the buffers).
        self._checked: int | None = None
        self._closed = False
        _OPEN.get().add(self)

    # -- where things are ----------------------------------------------------------------

    def uri(self, step: int) -> str:
        """The durable checkpoint of ``step``."""
        return step_uri(self.root, step)

    def fast_uri(self, step: int) -> str:
        """This node's fast-tier checkpoint of ``step``."""
        return step_uri(self.fast, step)

    def _fast_store(self, step: int) -> ByteStore:
        return self._fast_backend.open_store(self.fast_uri(step))

    def _take_fast_tier(self) -> None:
        """Make every node's fast tier this run's, or raise ValueError on every rank (collective).

        A node's first rank claims it (:data:`OWNER` names the root); then every other rank
        must find that claim in its own fast tier, else it is on another host than its node's
        first rank (the same node index on two hosts, whose fast tiers differ)."""
        leader = self.topology.is_leader
        for step, problem in (
            ("claim", lambda: self._claim_fast_tier() if leader else None),
            ("see", lambda: None if leader else self._see_fast_tier()),
        ):
            found = [p for p in _all_gather(self._coll, f"tiered: {step} the fast tier", problem()) if p]
            if found:
                raise ValueError(found[0])

    def _owner(self, claim: bool) -> str | None:
        """The root the fast tier's :data:`OWNER` file names (None: there is none); ``claim``:
        first make one naming this run's root, if there is none."""
        store = self._fast_backend.open_store(self.fast)
        if claim:
            from torchstow.interop.sources import local_path

            path = local_path(self.root)
            mine = self.root if path is None else os.path.abspath(path)
            store.prepare()
            try:
                store.publish_new(OWNER, json.dumps({"root": mine}).encode())
                return mine
            except FileExistsError:
                pass
        try:
            owner = json.loads(read_capped(store, OWNER, _OWNER_MAX_BYTES))["root"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, CorruptCheckpointError) as exc:
            return f"<unreadable: {exc}>"
        return owner if isinstance(owner, str) else repr(owner)

    def _claim_fast_tier(self) -> str | None:
        """(A node's first rank) why this node's fast tier cannot be this run's, or None: it
        belongs to a run with another root, whose steps a restore here would take and whose
        steps this run's saves and pruning would replace and delete."""
        from torchstow.interop.convert import same_location

        owner = self._owner(claim=True)
        if owner is None or same_location(owner, self.root):
            return None
        marker = self._fast_backend.open_store(self.fast).local_path(OWNER)
        where = self.fast if marker is None else f"{self.fast} (the folder {os.path.dirname(marker)})"
        return (
            f"the fast tier {self.fast} (node {self.node}) belongs to another run, whose root is "
            f"{owner}, not {self.root}: sharing it, this run would restore that run's steps and its "
            "saves and pruning would replace and delete them. Give each run a fast tier of its "
            f"own (fast=...), or, if that run is over and its fast-tier steps are no longer "
            f"needed, remove {where} first"
        )

    def _see_fast_tier(self) -> str | None:
        """(Every other rank, after the claims) why this rank does not share its node's fast
        tier, or None."""
        from torchstow.interop.convert import same_location

        owner = self._owner(claim=False)
        if owner is not None and same_location(owner, self.root):
            return None
        leader = self.topology.local_ranks[0]
        return (
            f"rank {self.topology.rank} and rank {leader} both say they are node {self.node}, but "
            f"rank {self.topology.rank} does not see the fast tier {self.fast} that rank {leader} "
            "uses: they are on different hosts, whose fast tiers differ, and the steps of one "
            "would never be found, replicated or pruned. A node's index is torchrun's GROUP_RANK, "
            "else TORCHSTOW_NODE, else 0: launched without torchrun (srun, mpirun), set "
            "TORCHSTOW_NODE to each host's index (under SLURM, its SLURM_NODEID)"
        )

    # -- saving -------------------------------------------------------------------------

    def save(
        self, step: int, state_dict: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None
    ) -> TieredSave:
        """Stage ``state_dict`` as ``step`` and return its :class:`TieredSave` (level ``staged``)."""
        check_step_number(step)
        if self._closed:
            raise RuntimeError("this CheckpointManager is closed")
        # The previous step's fast write reads the staging buffers we are about to refill; its
        # replication and pruning (which read the fast tier, not the buffers) may go on.
        self._released.wait()
        persist = step % self.persist_every == 0
        check = self._checked is None or step < self._checked
        self._checked = step
        handle = TieredSave(step, "durable" if persist else "replicated")
        started = time.perf_counter()
        staged: Any = None
        error: BaseException | None = None
        try:
            staged = self._stager.stage(state_dict)
        except Exception as exc:  # fails the fast save on every rank, not just here
            error = exc
        else:
            local = list(_tensors(local_view(staged)))  # a DTensor's bytes are its local shard's
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}
            nbytes = sum(storages.values())  # each staged buffer once, however many tensors view it
            handle._reach("staged", nbytes, started)
        user_metadata = {**(metadata or {}), "step": step, FAST_TIER_KEY: self.fast_template}
        self._handles = [h for h in self._handles if not h.done()] + [handle]
        self._released = released = threading.Event()  # this phase's own: an older one sets its own
        self._last_fast = self._fast_thread.submit(
            self._fast_steps, step, staged, error, user_metadata, handle, persist, released, check
        )
        # however the phase ends, the buffers are free for the next save once it has
        self._last_fast.add_done_callback(lambda _: released.set())
        return handle

    def _fast_steps(
        self,
        step: int,
        staged: Any,
        error: BaseException | None,
        user_metadata: dict[str, Any],
        handle: TieredSave,
        persist: bool,
        released: threading.Event,
        check: bool,
    ) -> None:
        """Write, commit, replicate (and persist or queue the persist of) one step; sets
        ``released`` as soon as nothing reads ``staged`` any more. With ``check``, first
        refuse a step older than a committed step under the root (:func:`check_step`)."""
        started = time.perf_counter()
        store = self._fast_store(step)
        writer = _FilesWriter(store, overwrite=True, thread_count=self._fast_backend.thread_count)
        try:
            if check:
                listed, _ = check_step(
                    self._coll, self.root, step, self.storage_options, listed=self._root_steps
                )
                if not listed:
                    self._checked = None  # the root could not be listed: look again at the next save
            if error is not None:
                save_state_dict({}, FailedWriter(error), collective=self._coll)
            metadata = save_state_dict(staged, writer, collective=self._coll, user_metadata=user_metadata)
            all_reduce(
                self._coll,
                "tiered: manifest on every node",
                lambda: self._publish_here(store, metadata),
                lambda _: None,
            )
        except BaseException as exc:
            if check:
                self._checked = None
            handle._fail(exc)
            return
        if not (persist and self.incremental):  # an incremental persist saves from the buffers
            released.set()
        handle._reach("fast", sum(writer.files.values()), started)
        started = time.perf_counter()
        sizes = _extents(metadata)
        try:
            moved = self._replicate(step, store, sorted(writer.files), sizes)
        except BaseException as exc:
            handle._fail(exc)
            return
        handle._reach("replicated", moved, started)
        if persist and self.incremental:
            self._persist_incremental(step, staged, user_metadata, handle)
        elif persist:
            with self._lock:
                self._pinned.add(step)
            job = _Persist(step, metadata, sorted(writer.files), handle)
            self._last_persist = self._persist_thread.submit(self._persist_phase, job)
        self._replicated = step
        try:
            self._prune_fast(step)
        except Exception as exc:
            logger.warning("pruning the fast tier %s failed: %s", self.fast, exc)

    def _publish_here(self, store: ByteStore, metadata: Metadata) -> None:
        """On each node's first rank: the step's manifest in this node's fast tier, stale files out."""
        if not self.topology.is_leader:
            return
        # Version 1: a fast tier's manifest travels between nodes as one byte string.
        publish_manifest(store, metadata, overwrite=True, version=1)
        live = {info.relative_path for info in (metadata.storage_data or {}).values()}
        store.delete_files([n for n in store.list_files() if is_data_file(n) and n not in live])

    def _replicate(self, step: int, store: ByteStore, files: list[str], sizes: dict[str, int]) -> int:
        """Send this rank's files to its replica holders, keep the files sent to it; bytes moved."""
        pairs = self.topology.replica_pairs(self.replicas)
        if not pairs:
            return 0
        rank = self._coll.rank
        written = _all_gather(self._coll, "tiered: files to replicate", files)
        schedule = [Transfer(s, d, name, sizes[name]) for s, d in pairs for name in written[s]]

        def exchange() -> None:
            received = run_transfers(
                self._group, rank, schedule, lambda n, b: _read(store, n, b), self.timeout
            )
            for name, data in received.items():
                _write(store, name, data)

        all_reduce(self._coll, "tiered: replication", exchange, lambda _: None)
        return sum(t.size for t in schedule if rank in (t.src, t.dst))

    def _prune_fast(self, current: int, newer: bool = True) -> None:
        """After ``current`` is replicated: keep the newest ``fast_keep`` committed steps up to it
        (and those a persist still needs) in this node's fast tier; remove the older rest, with
        what failed saves left, and (``newer``) any step newer than ``current`` (a timeline the
        run left when it restored an older step). Only on a node's first rank."""
        if not self.topology.is_leader:
            return
        with self._prune_lock:
            steps = fast_steps(self._fast_backend, self.fast)
            committed = [s for s in steps if s <= current and MANIFEST in self._fast_store(s).list_files()]
            with self._lock:
                keep = set(committed[-self.fast_keep :]) | self._pinned | {current}
            for step in steps:
                if step in keep or (step > current and not newer):
                    continue
                try:
                    self._fast_backend.delete(self.fast_uri(step))
                except Exception as exc:
                    logger.warning("removing step %d from the fast tier %s failed: %s", step, self.fast, exc)

    # -- persisting ---------------------------------------------------------------------

    def _persist_incremental(
        self, step: int, staged: Any, user_metadata: dict[str, Any], handle: TieredSave
    ) -> None:
        """Persist ``step`` from the staged state against the newest intact durable step (on the
        fast thread: the staged buffers are refilled by the next save), which the coordinator
        picks for every rank (:func:`~torchstow.management.bases.choose_base`: a rank that
        failed on its own to look for one would never join the save the others wait in). A
        save that failed after its manifest landed all the same makes the step durable, as a
        plain persist."""
        from torchstow.api import save, storage_writer

        started = time.perf_counter()
        writer = None
        try:
            base = choose_base(self._coll, self.root, step, self.storage_options, listed=self._root_steps)
            writer = storage_writer(self.uri(step), storage_options=self.storage_options)
            metadata = save(
                staged,
                storage_writer=writer,
                storage_options=self.storage_options,
                metadata=user_metadata,
                base=base,
                process_group=self._group,
            )
        except BaseException as exc:
            nbytes = self._committed_anyway(step, writer, exc)
            if nbytes is None:
                logger.warning("persisting step %d to %s failed: %s", step, self.root, exc)
                handle._fail(exc)
                return
            logger.warning(
                "persisting step %d to %s failed, but its manifest is committed: the step is durable: %s",
                step,
                self.root,
                exc,
            )
        else:
            nbytes = metadata.nbytes_written or 0
        handle._reach("durable", nbytes, started)
        self._prune_root(self._coll, step)

    def _committed_anyway(self, step: int, writer: StorageWriter | None, exc: BaseException) -> int | None:
        """After a failed incremental persist: the bytes it wrote when its manifest committed all
        the same, else None. Every rank learns it from the coordinator (which knows what its
        commit did) when every rank raised the save's own exception and no rank lost contact;
        otherwise the collective is not trusted and the step is not reported durable."""
        if (
            writer is None
            or not isinstance(exc, CheckpointException)
            or isinstance(exc, CheckpointTimeoutError)
        ):
            return None

        def committed() -> int | None:
            if writer.commit_outcome() is not True:
                return None
            return self._root_backend.read_metadata(self.uri(step)).nbytes_written or 0

        try:
            found: int | None = broadcast_from_coordinator(self._coll, "tiered: persist outcome", committed)
        except Exception as error:
            logger.warning("could not tell whether step %d committed in %s: %s", step, self.root, error)
            return None
        return found

    def _prune_root(self, coll: Collective, step: int) -> None:
        """After ``step`` persisted: prune the root on the coordinator, never deleting ``step``
        (:func:`~torchstow.management.prune.prune_after_commit`: a failure is a warning)."""
        if not coll.is_coordinator:
            return
        from torchstow.management.prune import prune_after_commit

        prune_after_commit(self, step)

    def _persist_phase(self, job: _Persist) -> None:
        retry, self._retry = self._retry, []
        for old in retry:
            old.retried = True
            self._persist_one(old)
        self._persist_one(job)

    def _persist_one(self, job: _Persist) -> None:
        """Copy ``job``'s step to the root and commit it there, as a save commits (on a
        failure a rank removes its copies only when the commit certainly did not happen).
        A retry first asks the root: a step whose manifest did land is durable as it is."""
        started = time.perf_counter()
        coll = self._persist_coll
        target = self._root_backend.open_store(self.uri(job.step))
        save_id = job.metadata.save_id
        assert save_id is not None
        writer = _RootCopy(target, coll.is_coordinator, save_id)
        progress = _SaveProgress()
        spans = spans_by_file(job.metadata)

        def copy() -> None:
            job.nbytes = writer.copy(self._fast_store(job.step), job.files, spans, again=job.retried)
            progress.handed = True

        def commit(_: list[Any]) -> None:
            progress.committing = True
            writer.commit(job.metadata)

        try:
            if job.retried and broadcast_from_coordinator(
                coll, "tiered: persist retry", lambda: is_committed(target, save_id)
            ):
                self._durable(job, started)
                return
            _write_and_commit(coll, writer, copy, commit, progress, "tiered: persist")
        except BaseException as exc:
            # This rank's copies are removed, or kept, already. Did the step commit? The
            # coordinator knows what its commit did; another rank reads the root back (once:
            # the read its cleanup made, if it made one).
            committed = writer.commit_outcome()
            self._persist_failed(job, exc, bool(committed), started)
            return
        self._durable(job, started)

    def _persist_failed(self, job: _Persist, exc: BaseException, committed: bool, started: float) -> None:
        """After a failed persist: a step whose manifest landed all the same is durable;
        retried once either way, so every rank runs the same persists (the retry finds a
        committed step as it is)."""
        if not job.retried:
            self._retry.append(job)
        if committed or job.handle.level == "durable":
            logger.warning(
                "persisting step %d to %s failed, but its manifest is committed: the step is durable: %s",
                job.step,
                self.root,
                exc,
            )
            self._durable(job, started)
            return
        if not job.retried:
            logger.warning(
                "persisting step %d to %s failed (retried at the next persist step): %s",
                job.step,
                self.root,
                exc,
            )
        else:
            with self._lock:
                self._pinned.discard(job.step)
        if job.handle.exception() is None:
            job.handle._fail(exc)

    def _durable(self, job: _Persist, started: float) -> None:
        """``job``'s step is committed in the root: its handle says so, the fast tier and the
        root are pruned."""
        with self._lock:
            self._pinned.discard(job.step)
        if job.handle.level != "durable":
            job.handle._clear_error()
            job.handle._reach("durable", job.nbytes, started)
        self._prune_root(self._persist_coll, job.step)
        try:  # the step this persist held back may go now (never one the fast thread is writing)
            self._prune_fast(self._replicated, newer=False)
        except Exception as exc:
            logger.warning("pruning the fast tier %s failed: %s", self.fast, exc)

    # -- waiting ------------------------------------------------------------------------

    def wait(self, level: str = "durable") -> None:
        """Wait until every pending save reached ``level`` (or the level it is due); raises the
        first failure among them."""
        if self._last_fast is not None:
            self._last_fast.result()
        if level == "durable" and self._last_persist is not None:
            self._last_persist.result()
        for handle in self._handles:
            handle.wait(level)

    def _quiesce(self) -> None:
        """Let every pending phase end (failures stay on their handles)."""
        if self._last_fast is not None:
            self._last_fast.result()
        if self._last_persist is not None:
            self._last_persist.result()

    def close(self) -> None:
        """Wait for pending saves and persists, then stop the background threads."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._fast_thread.shutdown()
            self._persist_thread.shutdown()
            self._stager.close()

    # -- what is where ------------------------------------------------------------------

    def _inventory(self) -> dict[int, Held]:
        """What this node's fast tier holds, by step (on the node's first rank; {} elsewhere)."""
        return inventory(self._fast_backend, self.fast) if self.topology.is_leader else {}

    def _nodes_holdings(self) -> dict[int, dict[int, Held]]:
        """Every node's inventory (collective)."""
        gathered = _all_gather(self._coll, "tiered: inventory", self._inventory())
        return {
            self.topology.nodes[r]: inv
            for r, inv in enumerate(gathered)
            if r == self.topology.ranks_of(self.topology.nodes[r])[0]
        }

    def _root_steps(self) -> set[int]:
        from torchstow.management.catalog import list_steps

        found = list_steps(self.root, storage_options=self.storage_options)  # not a user's best
        return {info.step for info in found if info.step is not None}

    def steps(self) -> list[StepInfo]:
        """Each step held complete in some tier, ascending, with its tiers; every rank calls it."""
        self._quiesce()
        holdings = self._nodes_holdings()
        fast = {c.step for c in complete_steps(holdings)}
        durable = self._root_steps() if self._coll.is_coordinator else set()
        durable = set(_all_gather(self._coll, "tiered: root steps", durable)[self._coll.coordinator_rank])
        tiers = {
            s: tuple(t for t, held in (("fast", fast), ("durable", durable)) if s in held)
            for s in fast | durable
        }
        return [StepInfo(s, tiers[s]) for s in sorted(tiers)]

    def latest_step(self) -> int | None:
        """The newest step held complete in some tier, or None; every rank calls it."""
        found = self.steps()
        return found[-1].step if found else None

    # -- restoring ----------------------------------------------------------------------

    def restore(self, state_dict: Mapping[str, Any], step: int | None = None) -> int:
        """Load the newest step (or ``step``) complete in some tier into ``state_dict``; returns it."""
        self._quiesce()
        self._checked = None  # the next save may be older than steps under the root
        holdings = self._nodes_holdings()
        for choice in complete_steps(holdings, step):
            # One pass over the bytes: every block is checked as it is loaded. Only when that
            # finds damage does every holder check its copies, so the damaged ones are left out.
            try:
                self._load(state_dict, choice)
                return choice.step
            except CheckpointException as exc:
                if not _damaged(exc):
                    raise
                logger.warning(
                    "step %d: a fast-tier copy is damaged; checking every copy: %s", choice.step, exc
                )
            self._verify(choice, holdings)
            if all(choice.holders.values()):
                break
            from_root = self._complete_from_root(choice)
            if from_root is None:
                logger.warning(
                    "step %d: damaged in the fast tiers and not durable; trying an older step", choice.step
                )
                continue
            choice = from_root
            break
        else:
            choice = self._from_root(step)
        self._load(state_dict, choice)
        return choice.step

    def _verify(self, choice: Choice, holdings: dict[int, dict[int, Held]]) -> None:
        """Check every block of the files this node holds (split among its ranks); drop bad holders."""
        local = self.topology.local_ranks
        mine = sorted(n for n, nodes in choice.holders.items() if self.node in nodes)
        mine = mine[local.index(self.topology.rank) :: len(local)]
        store = self._fast_store(choice.step)
        spans = spans_by_file(choice.metadata)
        bad = []
        for name in mine:
            problems = scan_file(store, name, spans.get(name))
            if problems:
                logger.warning(
                    "step %d: %s/%s is damaged (%s); reading it from another copy",
                    choice.step,
                    store.location,
                    name,
                    problems[0],
                )
                bad.append(name)
        for rank, names in enumerate(_all_gather(self._coll, "tiered: verify", bad)):
            for name in names:
                choice.holders[name].remove(self.topology.nodes[rank])

    def _root_manifest(self, step: int) -> Any:
        """The committed manifest of ``step`` in the root and its chunk table by name, read on
        the coordinator (collective: its failure, a manifest or table larger than a reader
        reads, say, raises on every rank); None when there is none."""

        def read() -> Any:
            store = self._root_backend.open_store(self.uri(step))
            try:
                data = manifest_bytes(store)
                table = peek_manifest(data).chunk_table
                return data, {table: read_capped(store, table, CHUNK_TABLE_MAX_BYTES)} if table else {}
            except FileNotFoundError:
                return None

        return broadcast_from_coordinator(self._coll, "tiered: durable manifest", read)

    def _complete_from_root(self, choice: Choice) -> Choice | None:
        """The root's part in loading ``choice.step``: the files no fast tier holds intact when
        the root holds this very save; the whole step when it holds another save of it (an
        incremental persist); None when it does not hold the step."""
        found = self._root_manifest(choice.step)
        if found is None:
            return None
        manifest, tables = found
        metadata = decode_metadata(
            manifest, source=f"{self.uri(choice.step)}/{MANIFEST}", read_file=_given(tables)
        )
        if metadata.save_id != choice.metadata.save_id:
            needed = {info.relative_path for info in (metadata.storage_data or {}).values()}
            return Choice(choice.step, metadata, manifest, {name: [] for name in needed}, root_files=needed)
        choice.root_files = {name for name, nodes in choice.holders.items() if not nodes}
        return choice

    def _from_root(self, step: int | None) -> Choice:
        steps = sorted(self._root_steps() if self._coll.is_coordinator else set())
        steps = _all_gather(self._coll, "tiered: durable steps", steps)[self._coll.coordinator_rank]
        if step is None and steps:
            step = steps[-1]
        if step is None or step not in steps:
            what = "any step" if step is None else f"step {step}"
            raise CheckpointNotFoundError(
                f"no tier holds {what} complete: not the fast tiers ({self.fast}), not {self.root}"
            )
        found = self._root_manifest(step)
        if found is None:  # listed, but a DCP-format checkpoint or one named otherwise
            raise CheckpointNotFoundError(
                f"step {step} under {self.root} is no torchstow checkpoint at {self.uri(step)} (a "
                "DCP-format one, or one named otherwise): a tiered manager restores its own steps "
                "only; load it with torchstow.load, or restore an older step"
            )
        manifest, tables = found
        metadata = decode_metadata(manifest, source=f"{self.uri(step)}/{MANIFEST}", read_file=_given(tables))
        needed = {info.relative_path for info in (metadata.storage_data or {}).values()}
        return Choice(step, metadata, manifest, {name: [] for name in needed}, root_files=needed)

    def _load(self, state_dict: Mapping[str, Any], choice: Choice) -> None:
        metadata = choice.metadata
        planner = DefaultLoadPlanner()
        planner.set_up_planner(state_dict, metadata, self._coll.is_coordinator)
        locations = metadata.storage_data or {}
        wanted = sorted(
            {
                locations[item.storage_index].relative_path
                for item in planner.create_local_plan().items
                if item.storage_index in locations
            }
        )
        everyone = _all_gather(self._coll, "tiered: files each rank reads", wanted)
        topology = self.topology
        sizes = _extents(metadata)
        schedule = []
        for rank, names in enumerate(everyone):
            for name in names:
                nodes = choice.holders[name]
                if not nodes or topology.nodes[rank] in nodes:
                    continue
                node = nodes[rank % len(nodes)]
                servers = topology.ranks_of(node)
                schedule.append(Transfer(servers[rank % len(servers)], rank, name, sizes[name]))
        store = self._fast_store(choice.step)

        def serve(name: str, buffer: torch.Tensor) -> None:
            try:
                _read(store, name, buffer)
            except (OSError, CorruptCheckpointError) as exc:  # the receiver's checks refuse what it gets
                logger.warning(
                    "step %d: cannot read %s/%s to send it: %s", choice.step, store.location, name, exc
                )

        received = (
            run_transfers(self._group, topology.rank, schedule, serve, self.timeout) if schedule else {}
        )
        root_store = self._root_backend.open_store(self.uri(choice.step)) if choice.root_files else None
        routes: dict[str, ByteStore] = {}
        for name in wanted:
            if self.node in choice.holders[name]:
                routes[name] = store
            elif name in choice.root_files and root_store is not None:
                routes[name] = root_store
        sources = TieredSources(f"step {choice.step} (tiered)", choice.manifest, routes, received, sizes)
        # Every block is checked as it is read, wherever it comes from (a received file by
        # the rank that receives it).
        from_root = any(name in choice.root_files for name in wanted)
        tuning = self._root_backend.tuned_by(self.uri(choice.step)) if from_root else self._fast_backend
        reader = LayoutReader(sources, thread_count=tuning.thread_count, verify_checksums=True)
        load_state_dict(state_dict, reader, collective=self._coll, metadata=metadata)


# the managers this process made (a forked child has none of them)
_OPEN: ProcessLocal[weakref.WeakSet[TieredManager]] = ProcessLocal(weakref.WeakSet)


def _finish_before_shutdown() -> None:
    """At interpreter exit, let the saves of managers not closed go on to the levels they are
    due (as ``close`` would) before the interpreter's thread pools stop taking work: their
    writes start threads, and would fail there, unseen."""
    for manager in list(_OPEN.peek() or ()):
        if not manager._closed:
            with contextlib.suppress(Exception):  # a failure stays on its step's handle
                manager._quiesce()


before_pools_stop(_finish_before_shutdown)


def _damaged(exc: CheckpointException) -> bool:
    """Whether a collective load failed on some rank because stored bytes were wrong or missing."""
    return any(isinstance(e, (CorruptCheckpointError, FileNotFoundError)) for e, _ in exc.failures.values())


def _extents(metadata: Metadata) -> dict[str, int]:
    """The bytes of each data file of ``metadata`` that its items span (from the start)."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return ends


def _copy_checked(source: ByteStore, target: ByteStore, name: str, spans: FileSpans | None) -> None:
    """Copy data file ``name`` from ``source`` to ``target``, checking every block on the way."""
    sink = target.create(name)
    try:
        problems = scan_file(
            source, name, spans, write=lambda b: sink.write([b]), write_keeps=sink.keeps_buffers
        )
        if problems:
            raise ChecksumMismatchError(
                f"{source.location}/{name} is damaged, not copied: " + "; ".join(str(p) for p in problems[:3])
            )
        sink.close()
    except BaseException:
        sink.abort()
        raise


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _read(store: ByteStore, name: str, buffer: torch.Tensor) -> None:
    store.read_into(name, [(0, tensor_bytes(buffer))])


def _write(store: ByteStore, name: str, data: torch.Tensor) -> None:
    store.prepare()
    store.delete_files([name])
    sink = store.create(name)
    try:
        sink.write([tensor_bytes(data)])
        sink.close()
    except BaseException:
        sink.abort()
        raise
