"""Publishing a manifest: exclusive or replacing, with an uncertain outcome resolved.

A new checkpoint is created exclusively (:meth:`ByteStore.publish_new`): of
two saves to one location exactly one commits; the other gets
:class:`CheckpointExistsError`. An overwrite replaces the manifest (the last
to commit wins). When the write fails in a way that leaves its outcome open
(a timeout, a lost reply, retries that met their own earlier success), the
manifest is read back: if it carries this save's id the save committed. Only the
store's failures (an ``OSError`` the store's call raised) are read back so: any other
exception raised while publishing (one a SIGTERM handler raises to stop training, say,
even an ``OSError`` such as SIGALRM's ``TimeoutError``) propagates as it is, the outcome
"landed" or "unknown", never "not landed": the store may still be at work (an upload
on another thread), so reading it back at once proves nothing. On the main thread,
where Python runs signal handlers, the store's call runs on a thread of its own, so
the two are never confused. :func:`publish_manifest` alone decides what a failure
means (landed, certainly not, unknown) and notes it in a :class:`CommitOutcome`: the
save's writer, ``copy`` and the tiered persist act on that note.
After a commit only the files of the manifest this save replaced are
removed, never those of a save still in flight.

A version-2 manifest's chunk table (named after the commit's save id) is
written, made durable, before the manifest is published: a crash in between
leaves a table no manifest names (debris for ``gc``), never a manifest
without its table.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torchstow.core.layout.location import decode_manifest, manifest_bytes
from torchstow.core.storage.store import ByteStore, NotDurableError
from torchstow.errors import CheckpointExistsError, CorruptCheckpointError, StorageIOError, TorchstowError
from torchstow.format.codec import encode_manifest, peek_manifest
from torchstow.format.files import MANIFEST
from torchstow.format.manifest import Metadata, located_files
from torchstow.format.table import TableLocations

__all__ = [
    "CommitOutcome",
    "UncertainCommitError",
    "committed_files",
    "committed_manifest",
    "is_committed",
    "landed",
    "listed_files",
    "manifest_files",
    "publish_manifest",
    "publish_waits_at_most",
]

logger = logging.getLogger(__name__)


def committed_manifest(store: ByteStore) -> Metadata | None:
    """The manifest committed at ``store`` now, decoded (its chunk table read), or None
    when there is none or it does not decode; raises what reading the store raised."""
    try:
        data = manifest_bytes(store)
    except (FileNotFoundError, CorruptCheckpointError):  # none, or more than a manifest holds
        return None
    try:
        return decode_manifest(store, data)
    except TorchstowError:
        return None


def manifest_files(metadata: Metadata) -> set[str]:
    """The files a decoded manifest names: its data files and its chunk table (version 2)."""
    locations = metadata.storage_data  # version 2: over the table it read, which knows its name
    table = {locations.table.name} if isinstance(locations, TableLocations) else set()
    return located_files(metadata) | table


def is_committed(store: ByteStore, save_id: str) -> bool:
    """Whether the manifest committed at ``store`` is save ``save_id``'s (its save id read,
    nothing else: not its chunk table): False when there is none, or another save's, or no
    torchstow manifest; raises what reading it raised."""
    try:
        data = manifest_bytes(store)
    except (FileNotFoundError, CorruptCheckpointError):  # none, or larger than torchstow writes one
        return False
    return peek_manifest(data).save_id == save_id


def landed(store: ByteStore, save_id: str) -> bool | None:
    """After publishing was interrupted by something other than the store (a signal
    handler's exception): True when the manifest at ``store`` is save ``save_id``'s, else
    None (the store may still be at work: unknown, never "not landed")."""
    try:
        return is_committed(store, save_id) or None
    except Exception:
        logger.warning("could not read %s back after an interrupted commit", store.location, exc_info=True)
        return None


class UncertainCommitError(StorageIOError):
    """Publishing the manifest failed, and reading the location back could not tell
    whether it landed: the save may have committed."""


def listed_files(store: ByteStore) -> set[str] | None:
    """Data files the committed manifest at ``store`` lists, and its chunk table (none
    without a manifest), or None when the location could not be read or its manifest does
    not decode (damaged, too large, another program's): what it names is then unknown, and
    ``gc`` must not take its files for debris."""
    try:
        data = manifest_bytes(store)
    except FileNotFoundError:
        return set()
    except Exception:
        logger.warning("could not read the committed manifest at %s", store.location, exc_info=True)
        return None
    try:
        return manifest_files(decode_manifest(store, data))
    except Exception:
        logger.warning("the committed manifest at %s does not decode", store.location, exc_info=True)
        return None


def committed_files(store: ByteStore) -> set[str]:
    """Data files the committed manifest at ``store`` lists (none if it cannot be read)."""
    return listed_files(store) or set()


def _is_ours(store: ByteStore, save_id: str, error: BaseException) -> bool:
    """Read the location back after a failed publish: is the committed manifest this save's?"""
    try:
        return is_committed(store, save_id)
    except Exception as exc:
        raise UncertainCommitError(
            f"committing {store.location} failed ({error}), and reading the manifest back to see whether "
            f"it landed failed too ({exc}): the outcome is unknown; check it with torchstow.info"
        ) from error


def _write_tables(store: ByteStore, tables: dict[str, bytes]) -> None:
    """Write a manifest's side files, durable before it is published: published as the
    manifest is (metadata, not data: a wrapper that transforms data leaves them as they are)."""
    for name, data in tables.items():
        store.publish(name, data)


class CommitOutcome:
    """What one :func:`publish_manifest` did, for the caller's cleanup after it raised:
    ``landed`` is True once the manifest landed, False while it certainly has not and
    will not (nothing was published yet, or the store's failure was read back), None
    when that is unknown."""

    __slots__ = ("landed",)

    def __init__(self) -> None:
        self.landed: bool | None = False


def publish_manifest(
    store: ByteStore,
    metadata: Metadata,
    *,
    overwrite: bool,
    version: int | None = None,
    outcome: CommitOutcome | None = None,
) -> None:
    """Write ``metadata`` (which carries its ``save_id``) as the location's manifest, in
    format ``version`` (default ``metadata.version``), its chunk table first.

    The one place that decides a commit's outcome, noted in ``outcome`` however it ends:
    a failure before the manifest is published (waiting for an earlier publish here that
    a signal handler interrupted, past :func:`publish_waits_at_most`'s limit:
    :class:`StorageIOError`; encoding it, writing its chunk table) is "not landed", and the
    chunk table goes; the store's failure (an ``OSError`` its call
    raised) while publishing is read back (this save's manifest there: it returns as committed; none or
    another's: "not landed", the table goes; the read-back failing:
    :class:`UncertainCommitError`, unknown); anything else raised while publishing (a
    signal handler's exception, whatever its type) propagates as it is, the outcome read
    back: landed, or unknown (never "not landed": the store may still be at work), the
    table kept. A manifest the store put in place but could not make durable
    (:class:`NotDurableError`, a directory ``fsync`` failing with ``EIO``) is unknown too:
    :class:`UncertainCommitError`, never a success.
    """
    assert metadata.save_id is not None
    outcome = outcome or CommitOutcome()
    outcome.landed = False
    tables: dict[str, bytes] = {}
    try:
        _after_interrupted(store.location)
        manifest, tables = encode_manifest(metadata, version)
        _write_tables(store, tables)
        outcome.landed = None  # unknown from here until publishing returns or surely failed
        _publish(store, metadata, manifest, overwrite, outcome)
    except UncertainCommitError:
        raise  # it may have landed: its table stays (gc removes it if it did not)
    except BaseException:
        # _publish notes "not landed" where the store failed and reading back showed it;
        # anything else raised while publishing may come before or after the manifest
        # lands: read it back here (landed, else unknown).
        if outcome.landed is None:
            outcome.landed = landed(store, metadata.save_id)
        else:
            _remove_tables(store, tables)
        raise
    outcome.landed = True


def _remove_tables(store: ByteStore, tables: dict[str, bytes]) -> None:
    """Remove the chunk table of a manifest that certainly did not land (never fails)."""
    if not tables:
        return
    try:
        store.delete_files(sorted(tables))
    except Exception:
        logger.warning("removing the chunk table of a failed commit at %s failed", store.location)


#: Publishes a signal handler's exception left running on their own threads, by location.
_unfinished: dict[str, threading.Thread] = {}

#: How long a publish waits for such a one at its location, in seconds (None: no limit).
_wait_limit: ContextVar[float | None] = ContextVar("torchstow_publish_wait_limit", default=None)


@contextmanager
def publish_waits_at_most(seconds: float | None) -> Iterator[None]:
    """Within it, :func:`publish_manifest` waits at most ``seconds`` (None: as long as it
    takes) for an earlier publish at its location that a signal handler interrupted."""
    token = _wait_limit.set(seconds)
    try:
        yield
    finally:
        _wait_limit.reset(token)


def _after_interrupted(location: str) -> None:
    """Wait for an interrupted publish at ``location`` to end, so that its manifest never
    lands over this one; past the limit (:func:`publish_waits_at_most`), fail (transient)."""
    earlier = _unfinished.get(location)
    if earlier is None:
        return
    limit = _wait_limit.get()
    _wait(earlier, limit)
    if earlier.is_alive():
        raise StorageIOError(
            f"committing {location}: an earlier save's publish there, interrupted by a signal handler "
            f"in this process, has not ended after {limit:g}s (it may still land); nothing was "
            "committed: save again once it has ended",
            transient=True,
        )
    _unfinished.pop(location, None)


def _wait(thread: threading.Thread, limit: float | None = None) -> None:
    """Wait for ``thread``, at most ``limit`` seconds (None: no limit), waking now and then:
    a signal another thread took is handled here."""
    deadline = math.inf if limit is None else time.monotonic() + limit
    while thread.is_alive() and (left := deadline - time.monotonic()) > 0:
        thread.join(min(0.1, left))


def _store_call(location: str, fn: Callable[[], None]) -> BaseException | None:
    """Run the store's ``fn`` at ``location``: the exception it raised, or None.

    What this raises instead is not the store's: on the main thread, where Python runs
    signal handlers, ``fn`` runs on a thread of its own while this one waits, so an
    exception a handler raises meanwhile propagates from the wait, the store's call
    going on (as an upload on another thread would anyway). Where Python refuses to
    start a thread (3.12+ at interpreter shutdown), ``fn`` runs on this thread, as off
    the main thread (a handler's ``RuntimeError`` raised within ``Thread.start`` is no
    refusal: it propagates). An interrupted call is noted at ``location`` (see
    :func:`_after_interrupted`).
    """
    if threading.current_thread() is not threading.main_thread():
        return _outcome(fn)
    raised: list[BaseException | None] = []
    worker = threading.Thread(
        target=lambda: raised.append(_outcome(fn)), name="torchstow-commit", daemon=True
    )
    try:
        try:
            worker.start()  # a handler may raise here too, the store's call begun or not
        except RuntimeError as exc:
            if not _refused(exc):
                raise
            # Python refused the thread (3.12+ at interpreter shutdown, as from an atexit
            # handler; or no thread left): the store's call, not begun, runs here.
            return _outcome(fn)
        _wait(worker)
    except BaseException:
        _unfinished[location] = worker
        raise
    return raised[0]


def _refused(exc: RuntimeError) -> bool:
    """Whether ``Thread.start`` raised ``exc`` itself, Python refusing the thread (its C call
    has no frame: ``start``'s own is the innermost of the traceback), rather than a signal
    handler that ran within it (whose frame is then the innermost)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is getattr(threading.Thread.start, "__code__", None)


def _outcome(fn: Callable[[], None]) -> BaseException | None:
    """Call ``fn``: the exception it raised, or None."""
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def _publish(
    store: ByteStore, metadata: Metadata, manifest: bytes, overwrite: bool, outcome: CommitOutcome
) -> None:
    """Publish the manifest; where the store's own call fails with an ``OSError``, read the
    location back: this save's manifest there is a success, else ``outcome`` is "not landed"."""
    assert metadata.save_id is not None
    put = store.publish if overwrite else store.publish_new
    error = _store_call(store.location, lambda: put(MANIFEST, manifest))
    if error is None:
        return
    if not isinstance(error, OSError):
        raise error
    # A retried conditional write can meet its own first attempt, any failure its own success.
    ours = _is_ours(store, metadata.save_id, error)
    if ours and isinstance(error, NotDurableError):  # in place, but maybe not after a crash
        raise UncertainCommitError(
            f"committing {store.location}: {error}. The save failed and every file is kept (the "
            "checkpoint loads now, but its commit is not durable); save again (overwrite=True here) "
            "once the storage is sound"
        ) from error
    if not ours:
        outcome.landed = False
        if isinstance(error, FileExistsError):
            raise CheckpointExistsError(
                f"another save committed a checkpoint at {store.location} first; pass overwrite=True "
                "to replace it (this save's files were removed, the other's are untouched)"
            ) from error
        raise error
    logger.warning(
        "writing the manifest of %s reported a failure, but reading it back shows this save committed",
        store.location,
    )
