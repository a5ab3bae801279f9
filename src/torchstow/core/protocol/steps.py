"""The save and load protocols: local plans, a global plan on the coordinator,
every rank moves its bytes, the coordinator commits.

Each step runs on every rank with its failures captured; the outcomes meet on
the coordinator, and if any rank failed, every rank raises the same
:class:`CheckpointException` naming each failed rank and its exception.

What the coordinator sends back can fail too, where it arrives: a value that
does not unpickle on one rank (a plugin's class installed on some nodes only).
Over a process group, every value but torchstow's own markers (no value, a
failure, "unchanged") and plain numbers and strings is therefore confirmed:
each rank says in one all-gather of a byte whether it unpickled it, and if one
could not, the ranks exchange those failures and every rank raises them, before
any rank acts on the value.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from torchstow.core.accepted_kwargs import call_with_accepted
from torchstow.core.futures import wait_future
from torchstow.core.layout.commit import publish_waits_at_most
from torchstow.core.planning import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
)
from torchstow.core.planning.read_once import ReadOnceProbe, plan_read_once
from torchstow.core.protocol import fan_out
from torchstow.core.protocol.collective import Collective, SingleProcess
from torchstow.core.protocol.failures import CapturedFailure, capture, pack, unpack
from torchstow.core.protocol.plan_cache import plan_save
from torchstow.core.protocol.stats import SaveStats
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, bytes_written
from torchstow.errors import CheckpointException
from torchstow.format.manifest import Metadata

__all__ = ["load_state_dict", "save_state_dict"]

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
_R = TypeVar("_R")


def _timed(step: str, rank: int, stats: SaveStats | None = None) -> Callable[[_F], _F]:
    """Log (DEBUG) how long each call of the decorated step takes on this rank
    (``save plan took 0.012 s on rank 0``), and add it to ``stats`` under its
    phase (``plan``)."""
    phase = step.partition(" ")[2]

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                logger.debug("%s took %.3f s on rank %d", step, elapsed, rank)
                if stats is not None:
                    stats.record(phase, elapsed)

        return timed  # type: ignore[return-value]

    return decorate


class _Failed:
    """What travels between ranks when a step failed somewhere: rank -> failure.

    ``outcome_unknown`` is set by a coordinator whose commit failed but may have
    landed, or did (see :func:`_write_and_commit`): the other ranks then read the
    location rather than remove their files.
    """

    __slots__ = ("failures", "outcome_unknown")

    def __init__(self, failures: dict[int, CapturedFailure], outcome_unknown: bool = False) -> None:
        self.failures = failures
        self.outcome_unknown = outcome_unknown


class _Unchanged:
    """Sent back for a rank whose value the coordinator left as it was."""

    __slots__ = ()


def _outgoing(coll: Collective, value: Any) -> tuple[Any, CapturedFailure | None]:
    """``value`` ready to send, and the failure to pickle it if that failed.

    Values cross processes as bytes packed here, so that what cannot be
    pickled fails its rank instead of the collective; in a single process
    they are handed over as they are.
    """
    return pack(value) if coll.crosses_processes else (value, None)


def _incoming(coll: Collective, payload: Any) -> Any:
    return unpack(payload) if coll.crosses_processes else payload


#: The types of what the coordinator sends that unpickles on every rank (exactly these
#: types, not subclasses, which may live in a module some rank lacks): no confirmation
#: follows it.
_PLAIN = frozenset({type(None), bool, int, float, str, _Failed, _Unchanged})
#: The byte after the coordinator's pickled value (unpickling ignores what follows the
#: pickle): whether the ranks confirm that they unpickled the value (see :func:`_confirm`).
_CONFIRM, _NO_CONFIRM = b"\x01", b"\x00"


def _downward(
    coll: Collective, values: list[Any], gathered: list[Any] | None = None, unknown: bool = False
) -> list[Any]:
    """The coordinator's values for every rank, ready to send.

    If one cannot be packed, every rank gets the coordinator's failure instead
    (``unknown``: a failure whose outcome is unknown, see :class:`_Failed`). With
    ``gathered`` (what each rank sent), a value that packs to the very bytes its rank
    sent goes back as an :class:`_Unchanged` marker. Each payload ends in a byte that
    tells every rank, even one that cannot unpickle it, whether a confirmation follows.
    """
    if not coll.crosses_processes:
        return values
    packed = [pack(value) for value in values]
    failure = next((failure for _, failure in packed if failure is not None), None)
    if failure is not None:
        data = [pack(_Failed({coll.rank: failure}, unknown))[0]] * len(values)
        plain = True
    else:
        data = [payload for payload, _ in packed]
        kept = [type(value) in _PLAIN for value in values]
        if gathered is not None:
            unchanged = pack(_Unchanged())[0]
            for i, (new, old) in enumerate(zip(data, gathered, strict=True)):
                if new == old:
                    data[i], kept[i] = unchanged, True
        plain = all(kept)
    flag = _NO_CONFIRM if plain or not coll.confirms_receipt else _CONFIRM
    return [payload + flag for payload in data]


def _confirm(coll: Collective, step: str, payload: Any, value: Any) -> None:
    """Where the coordinator's ``payload`` asks for it, tell every rank whether this one
    unpickled it (``value`` is a :class:`CapturedFailure` where it did not); if any rank
    could not, every rank raises the step's CheckpointException naming those ranks with
    their errors (each such rank its own exception object)."""
    if not (coll.crosses_processes and payload[-1:] == _CONFIRM):
        return
    failed = isinstance(value, CapturedFailure)
    flags = coll.all_gather_records(bytes([failed]), step)
    if any(flag != bytes(1) for flag in flags):
        all_reduce(coll, step, lambda: value if failed else None, lambda _: None)


def _receive(coll: Collective, step: str, payload: Any, own: CapturedFailure | None) -> Any:
    """The coordinator's value as this rank unpickled it, once every rank confirmed it could
    (see :func:`_confirm`); raises the step's CheckpointException if any rank failed."""
    value = _incoming(coll, payload)
    _confirm(coll, step, payload, value)
    return _raise_if_failed(step, value, coll, own)


def _raise_if_failed(step: str, value: Any, coll: Collective, own: CapturedFailure | None) -> Any:
    """Raise the step's CheckpointException if any rank failed in it.

    The rank that failed keeps its own exception object (with its traceback);
    the others hold the copy that travelled.
    """
    if isinstance(value, CapturedFailure):  # what the coordinator sent did not unpack here
        raise CheckpointException.from_failures(step, {coll.rank: value.as_failure()})
    if isinstance(value, _Failed):
        failures = {rank: failure.as_failure() for rank, failure in value.failures.items()}
        if own is not None and coll.rank in failures:
            failures[coll.rank] = own.as_failure()
        raise CheckpointException.from_failures(step, failures)
    return value


def _incoming_all(coll: Collective, gathered: list[Any]) -> list[Any]:
    """What each rank sent, as the coordinator unpacks it; a failure sent as the very bytes
    of one already unpacked (ranks failing alike, as SPMD ranks do: a state dict that does
    not match on every rank) becomes that same object, so the failure sent back to every
    rank carries it once (pickle keeps the sharing), not once per rank."""
    if not coll.crosses_processes:
        return list(gathered)
    seen: dict[bytes, CapturedFailure] = {}
    outcomes = []
    for data in gathered:
        outcome = seen.get(data) if seen else None  # no hashing of plans while none failed
        if outcome is None:
            outcome = _incoming(coll, data)
            if isinstance(outcome, CapturedFailure):
                seen[data] = outcome
        outcomes.append(outcome)
    return outcomes


def _coordinate(
    coll: Collective,
    step: str,
    local_fn: Callable[[], Any],
    global_fn: Callable[[list[Any]], Any],
) -> tuple[CapturedFailure | None, Any, list[Any] | None]:
    """Run ``local_fn`` everywhere, ``global_fn`` on the coordinator over all
    outcomes. Returns this rank's own failure (if any) and, on the
    coordinator, ``global_fn``'s value or a :class:`_Failed`, and what each
    rank sent."""
    local = capture(local_fn)
    own = local if isinstance(local, CapturedFailure) else None
    data, unpicklable = _outgoing(coll, local)
    own = own or unpicklable
    gathered = coll.gather(data, step)
    if not coll.is_coordinator:
        return own, None, None
    assert gathered is not None
    outcomes = _incoming_all(coll, gathered)
    failures = {rank: out for rank, out in enumerate(outcomes) if isinstance(out, CapturedFailure)}
    if failures:
        return own, _Failed(failures), gathered
    result = capture(lambda: global_fn(outcomes))
    if isinstance(result, CapturedFailure):
        return result, _Failed({coll.rank: result}), gathered
    return own, result, gathered


def reduce_scatter(
    coll: Collective,
    step: str,
    local_fn: Callable[[], Any],
    global_fn: Callable[[list[Any]], list[Any]],
) -> Any:
    """Gather local outcomes, let the coordinator turn them into one value per
    rank, and hand each rank its own.

    A value that comes out of the coordinator as it went in (the same bytes,
    as with the default load planning) goes back as a marker, and the rank
    keeps its own: plans of many items are not sent back for nothing.
    """
    sent: list[Any] = []

    def local() -> Any:
        sent.append(local_fn())
        return sent[0]

    def one_per_rank(outcomes: list[Any]) -> list[Any]:
        values = list(global_fn(outcomes))
        if len(values) != coll.world_size:  # a faulty planner: fail here, on every rank
            raise ValueError(f"{step}: the global plan has {len(values)} entries for {coll.world_size} ranks")
        return values

    own, result, gathered = _coordinate(coll, step, local, one_per_rank)
    packed = None
    if coll.is_coordinator:
        failed = isinstance(result, _Failed)
        # a failure goes to every rank alike: packed once
        packed = _downward(coll, [result]) * coll.world_size if failed else _downward(coll, result, gathered)
    value = _receive(coll, step, coll.scatter(packed, step), own)
    return sent[0] if isinstance(value, _Unchanged) else value


def all_reduce(
    coll: Collective,
    step: str,
    local_fn: Callable[[], Any],
    global_fn: Callable[[list[Any]], Any],
) -> Any:
    """Gather local outcomes, let the coordinator reduce them, broadcast the result."""
    own, result, _ = _coordinate(coll, step, local_fn, global_fn)
    packed = _downward(coll, [result])[0] if coll.is_coordinator else None
    return _receive(coll, step, coll.broadcast(packed, step), own)


def broadcast_from_coordinator(coll: Collective, step: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the coordinator only and give every rank its value."""
    own = None
    packed = None
    if coll.is_coordinator:
        result = capture(fn)
        if isinstance(result, CapturedFailure):
            own = result
            result = _Failed({coll.rank: result})
        packed = _downward(coll, [result])[0]
    return _receive(coll, step, coll.broadcast(packed, step), own)


def _require_mapping(state_dict: Any) -> None:
    """Reject a state dict that is not a mapping at once, before any collective."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"a state dict must be a mapping, got {type(state_dict).__name__}")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off for the duration, on the main thread.

    A checkpoint of many small tensors allocates tens of thousands of plan
    objects; with the collector on, its repeated passes over them cost more
    than the save itself. Nothing the protocol allocates forms cycles. The
    collector is process-wide, so a save running on a background thread (an
    async save) leaves it alone rather than pause it under the training loop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@gc_paused()
def save_state_dict(
    state_dict: Mapping[str, Any],
    storage_writer: StorageWriter,
    *,
    planner: SavePlanner | None = None,
    collective: Collective | None = None,
    checkpoint_id: str | None = None,
    user_metadata: dict[str, Any] | None = None,
    stats: SaveStats | None = None,
) -> Metadata:
    """Save ``state_dict`` through ``storage_writer`` as one collective step.

    Returns the committed :class:`Metadata` on every rank. Each phase's
    seconds, and the bytes this rank wrote, go into ``stats``; the manifest
    records how long the save took on the coordinator (with the staging
    ``stats`` holds already) until its commit.
    """
    started = time.perf_counter()
    _require_mapping(state_dict)
    coll = collective or SingleProcess()
    planner = planner or DefaultSavePlanner()
    global_metadata: list[Metadata] = []

    @_timed("save plan", coll.rank, stats)
    def local_plan() -> SavePlan:
        storage_writer.reset(checkpoint_id)
        call_with_accepted(
            storage_writer.set_up_storage_writer,
            coll.is_coordinator,
            rank=coll.rank,
            world_size=coll.world_size,
        )
        planner.set_up_planner(state_dict, None, coll.is_coordinator)
        return storage_writer.prepare_local_plan(planner.create_local_plan())

    @_timed("save coordinate", coll.rank, stats)
    def global_plan(all_plans: list[SavePlan]) -> list[SavePlan]:
        plans, metadata = planner.create_global_plan(all_plans)
        if user_metadata:
            metadata.user_metadata = dict(user_metadata)
        global_metadata.append(metadata)
        return storage_writer.prepare_global_plan(plans)

    planned = plan_save(
        coll, planner, storage_writer, local_plan, global_plan, reduce_scatter, global_metadata
    )

    progress = _SaveProgress()

    @_timed("save write", coll.rank, stats)
    def write() -> Any:
        final_plan = planner.finish_plan(planned.plan)
        results = wait_future(storage_writer.write_data(final_plan, planner))
        if not isinstance(results, Sequence):
            results = list(results)
        if stats is not None:
            stats.bytes_written = bytes_written(results)
        outcome = planned.outcome(results)
        progress.handed = True
        return outcome

    @_timed("save commit", coll.rank, stats)
    def commit(outcomes: list[Any]) -> Metadata:
        made = global_metadata[0] if global_metadata else None
        metadata, all_results = planned.commit_inputs(made, outcomes, user_metadata)
        staging = stats.seconds.get("stage", 0.0) if stats is not None else 0.0
        metadata.save_seconds = staging + time.perf_counter() - started
        progress.committing = True
        storage_writer.finish(metadata, all_results)
        return metadata

    return _write_and_commit(coll, storage_writer, write, commit, progress)


class _SaveProgress:
    """How far this rank got in the write-and-commit step of one save."""

    __slots__ = ("committing", "handed")

    def __init__(self) -> None:
        #: This rank wrote its part and is handing its results to the coordinator.
        self.handed = False
        #: (Coordinator) the writer's ``finish`` was called: the manifest may land.
        self.committing = False


def _write_and_commit(
    coll: Collective,
    writer: StorageWriter,
    write: Callable[[], Any],
    commit: Callable[[list[Any]], _R],
    progress: _SaveProgress,
    step: str = "save write",
) -> _R:
    """Every rank writes, the coordinator commits, every rank learns the outcome (the
    tiered manager's persist goes through here too, as ``step``).

    When the save fails, a rank removes what it wrote only if it knows for
    certain that the commit did not and will not happen: its own write failed,
    the coordinator never began the commit, or the coordinator says its commit
    failed for good. Once its results are handed over and the answer is lost (a
    rank died, a collective failed or timed out, or it does not unpickle here) or
    the coordinator cannot tell, the outcome is unknown: the rank asks the writer to read the location
    (:meth:`StorageWriter.commit_outcome`) and otherwise keeps its files, for a
    later ``gc`` to collect; a committed manifest may name them. A committed answer
    that some rank cannot unpickle fails the save on every rank, each keeping its files.
    """
    try:
        with publish_waits_at_most(_answer_within(coll)):
            own, result, _ = _coordinate(coll, step, write, commit)
    except CheckpointException as exc:  # the gather broke
        _settle(writer, coll, progress, exc, known=coll.is_coordinator or not progress.handed)
        raise
    packed = None
    if coll.is_coordinator:
        if isinstance(result, _Failed) and progress.committing:
            # landed or unknown: never "failed for good", which lets every rank remove its files
            result.outcome_unknown = _outcome(writer, progress) is not False
        # a committed manifest that does not pickle: the ranks are told to look
        packed = _downward(coll, [result], unknown=progress.committing)[0]
    try:
        payload = coll.broadcast(packed, step)
    except CheckpointException as exc:  # the answer was lost
        _settle(writer, coll, progress, exc, known=coll.is_coordinator or not progress.handed)
        raise
    answer = _incoming(coll, payload)
    try:
        _confirm(coll, step, payload, answer)
        return _raise_if_failed(step, answer, coll, own)
    except CheckpointException as exc:
        if not isinstance(answer, CapturedFailure | _Failed):  # committed; another rank lacks the answer
            _note_committed(exc, coll)
            raise
        # An answer that did not unpickle here may have been the committed manifest.
        unclear = isinstance(answer, CapturedFailure) or answer.outcome_unknown
        unknown = unclear and not coll.is_coordinator
        _settle(writer, coll, progress, exc, known=not unknown or not progress.handed)
        raise


def _answer_within(coll: Collective) -> float | None:
    """Seconds the coordinator's commit may wait for an earlier, interrupted publish at the
    location: half the time the other ranks wait for its answer, so that its failure still
    reaches them (None: no limit, where no rank waits under a timeout)."""
    timeout = coll.step_timeout()
    return None if timeout is None else timeout.total_seconds() / 2


def _outcome(writer: StorageWriter, progress: _SaveProgress) -> bool | None:
    """True if this save committed, False if it certainly did not and will not, None if unknown."""
    if not progress.handed:  # the coordinator got this rank's failure, not its results
        return False
    try:
        return writer.commit_outcome()
    except Exception:
        logger.warning("could not tell whether the failed save committed", exc_info=True)
        return None


def _settle(
    writer: StorageWriter, coll: Collective, progress: _SaveProgress, exc: CheckpointException, known: bool
) -> None:
    """After a failed save: remove this rank's data if the commit certainly did not and
    will not happen, else keep it and say what reading the location showed.

    ``known`` says that this rank's view settles the question without reading the
    location (its own write failed, it is the coordinator, or the coordinator said so);
    on the coordinator the writer still decides once ``finish`` was called.
    """
    if known and not (coll.is_coordinator and progress.committing):
        _abort(writer)
        return
    committed = _outcome(writer, progress)
    if committed is False:
        _abort(writer)
    elif committed:
        _note_committed(exc, coll)
    else:
        exc.add_note(
            f"rank {coll.rank}: whether the checkpoint committed is unknown here, so this rank's "
            "files are kept: a committed manifest may name them. If none did, torchstow gc removes "
            "them after its grace period (torchstow.delete(..., force=True) at once)"
        )


def _note_committed(exc: CheckpointException, coll: Collective) -> None:
    exc.add_note(
        f"rank {coll.rank}: the checkpoint did commit (its manifest is this save's); "
        "this rank's files are kept"
    )


def _abort(storage_writer: StorageWriter) -> None:
    """Let the writer remove this rank's data of a save that certainly did not commit;
    never mask the failure."""
    try:
        storage_writer.abort()
    except Exception:
        logger.warning("cleaning up after a failed save failed too", exc_info=True)


@gc_paused()
def load_state_dict(
    state_dict: Mapping[str, Any],
    storage_reader: StorageReader,
    *,
    planner: LoadPlanner | None = None,
    collective: Collective | None = None,
    checkpoint_id: str | None = None,
    metadata: Metadata | None = None,
    read_once: bool = True,
) -> None:
    """Load into ``state_dict`` in place through ``storage_reader``, collectively.

    The coordinator reads the manifest once and broadcasts it, unless the
    caller already holds it (``metadata``, on every rank). With ``read_once``
    (and a collective that can exchange buffers), stored regions several ranks
    need are read by one of them and sent to the others (see
    :mod:`torchstow.core.planning.read_once`).
    """
    _require_mapping(state_dict)
    coll = collective or SingleProcess()
    planner = planner or DefaultLoadPlanner()
    reset_done = False
    exchanging = read_once and coll.world_size > 1 and coll.can_exchange

    @_timed("load metadata", coll.rank)
    def read_metadata() -> Metadata:
        nonlocal reset_done
        reset_done = True
        storage_reader.reset(checkpoint_id)
        return storage_reader.read_metadata()

    if metadata is None:
        metadata = broadcast_from_coordinator(coll, "load reading metadata", read_metadata)
    loaded = metadata

    @_timed("load plan", coll.rank)
    def local_plan() -> LoadPlan:
        if not reset_done:
            storage_reader.reset(checkpoint_id)
        call_with_accepted(
            storage_reader.set_up_storage_reader,
            loaded,
            coll.is_coordinator,
            rank=coll.rank,
            world_size=coll.world_size,
        )
        planner.set_up_planner(state_dict, loaded, coll.is_coordinator)
        return storage_reader.prepare_local_plan(planner.create_local_plan())

    @_timed("load coordinate", coll.rank)
    def global_plan(all_plans: list[LoadPlan]) -> list[LoadPlan]:
        return storage_reader.prepare_global_plan(planner.create_global_plan(all_plans))

    if not exchanging:
        central_plan: LoadPlan = reduce_scatter(coll, "load planning", local_plan, global_plan)

        @_timed("load read", coll.rank)
        def read() -> None:
            final_plan = planner.finish_plan(central_plan)
            wait_future(storage_reader.read_data(final_plan, planner))

        all_reduce(coll, "load read", read, lambda _: None)
        return
    _load_read_once(coll, storage_reader, planner, loaded, local_plan, global_plan)


def _load_read_once(
    coll: Collective,
    storage_reader: StorageReader,
    planner: LoadPlanner,
    metadata: Metadata,
    local_plan: Callable[[], LoadPlan],
    global_plan: Callable[[list[LoadPlan]], list[LoadPlan]],
) -> None:
    """Plan who reads what, then read this rank's part while the shared bytes fan out.

    A failure anywhere leaves no rank waiting: a rank whose read failed still takes
    part in every transfer (sending zeros), and the outcomes meet after the
    fan-out, so every rank raises the same CheckpointException.
    """

    def plan_all(outcomes: list[tuple[LoadPlan, ReadOnceProbe]]) -> list[Any]:
        sent = [plan for plan, _ in outcomes]
        plans = global_plan(sent)
        roles = plan_read_once(plans, metadata, [probe for _, probe in outcomes])
        # A plan that comes back as it went travels as None: the rank keeps its own.
        return [
            (None if plan is old else plan, role) for plan, old, role in zip(plans, sent, roles, strict=True)
        ]

    sent_plan: list[LoadPlan] = []

    def local() -> tuple[LoadPlan, ReadOnceProbe]:
        sent_plan.append(local_plan())
        return sent_plan[0], fan_out.probe(planner, sent_plan[0], metadata)

    new_plan, role = reduce_scatter(coll, "load planning", local, plan_all)
    plan: LoadPlan = new_plan if new_plan is not None else sent_plan[0]

    @_timed("load read", coll.rank)
    def read() -> CapturedFailure | None:
        return fan_out.fan_out(coll, storage_reader, planner, plan, role, "load fan-out")

    failure = read()

    def outcome() -> None:
        if failure is not None:
            raise failure.exc

    all_reduce(coll, "load read", outcome, lambda _: None)
