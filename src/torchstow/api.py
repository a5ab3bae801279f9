"""The user-facing functions: save and load state dicts by URI.

Each call resolves the URI to a backend through the installed plugins, then
runs the collective protocol of :mod:`torchstow.core.protocol.steps`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from torchstow.checkpointing.async_save import AsyncSave, AsyncSavePipeline, SaveJob, _FailedWriter, pipeline
from torchstow.compat import dcp_calls
from torchstow.core.layout.digest_memo import own_slot, staged_slot
from torchstow.core.layout.incremental import BaseContent
from torchstow.core.layout.location import read_manifest
from torchstow.core.layout.mapped import map_checkpoint
from torchstow.core.layout.reader import require_data
from torchstow.core.layout.writer import DigestSlots, LayoutWriter, set_format_version
from torchstow.core.planning import DefaultLoadPlanner, DefaultSavePlanner, LoadPlan, LoadPlanner, SavePlanner
from torchstow.core.protocol.collective import Collective, Timeout, make_collective
from torchstow.core.protocol.materialize import materialize
from torchstow.core.protocol.stats import SaveStats
from torchstow.core.protocol.steps import load_state_dict as _load_protocol
from torchstow.core.protocol.steps import save_state_dict as _save_protocol
from torchstow.core.staging.protocol import Stager
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.forwarding import ForwardingStorageWriter
from torchstow.core.storage.interfaces import StorageReader, StorageWriter
from torchstow.errors import CheckpointException
from torchstow.format.compression import check_compression
from torchstow.format.manifest import FORMAT_VERSION, Metadata
from torchstow.format.structure import build_nested
from torchstow.plugins.resolve import Uri, backend_at

__all__ = [
    "async_save",
    "load",
    "read",
    "save",
    "storage_reader",
    "storage_writer",
]


def storage_writer(
    uri: Uri,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    compression: str | None = None,
) -> StorageWriter:
    """A writer for a checkpoint at ``uri``, from the backend its scheme names,
    built with ``storage_options`` (for ``save(storage_writer=...)``); ``compression``
    as in :func:`save`."""
    check_compression(compression)
    text, backend = backend_at(uri, storage_options)
    writer = backend.storage_writer(text, overwrite=overwrite)
    _attach_compression(writer, compression)
    return writer


def storage_reader(uri: Uri, *, storage_options: dict[str, Any] | None = None) -> StorageReader:
    """A reader for the checkpoint at ``uri``, from the backend its scheme names,
    built with ``storage_options`` (for ``load(storage_reader=...)``).

    On byte-store backends it reads checkpoints written by stock ``dcp.save`` too.
    """
    text, backend = backend_at(uri, storage_options)
    return backend.storage_reader(text)


_open_reader = storage_reader  # for load, whose ``storage_reader`` keyword hides the function


class _FailedReader(StorageReader):
    """Stands in for a rank whose load failed before the protocol began: it fails the
    protocol's first step there (reading the manifest, or planning), so every rank fails
    as one."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        raise self.error

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        raise self.error

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        raise self.error

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        raise self.error

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        raise self.error

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _fail_everywhere(exc: Exception, collective: Collective, protocol: Callable[[], Any]) -> NoReturn:
    """After ``exc`` on this rank while its call prepared, before the first collective: run
    ``protocol`` with a stand-in that fails its first step, where the other ranks already
    are, so that every rank raises the same CheckpointException. Where every rank failed
    alike (the same bad argument everywhere), each raises its own error instead, as a
    single process does (at once: it has no other rank to tell)."""
    if collective.world_size == 1:
        raise exc
    try:
        protocol()
    except CheckpointException as failed:
        kinds = {type(error) for error, _ in failed.failures.values()}
        if len(failed.failures) != collective.world_size or kinds != {type(exc)}:
            raise
    raise exc


@dataclass(frozen=True)
class _Distributed:
    """Where a collective call runs: the group, its coordinator, single-process or not,
    and how long a rank waits for the others (the keywords every collective call takes),
    and whether it may talk to them at all (DCP's ``use_collectives``, of saves)."""

    process_group: Any = None
    coordinator_rank: int = 0
    no_dist: bool | None = None
    timeout: Timeout | None = None
    use_collectives: bool = True

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> _Distributed:
        """The settings among a call's ``arguments`` (those it lacks take their defaults)."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls) if field.name in arguments})

    def collective(self, saves: AsyncSavePipeline | None = None) -> Collective:
        """The collective the call runs on; ``saves``: an async save's, on the commit group
        of that pipeline."""
        make = make_collective if saves is None else saves.commit_collective
        collective = make(self.process_group, self.coordinator_rank, self.no_dist, self.timeout)
        return dcp_calls.without_collectives(collective, self.use_collectives)


def collective_of(options: Mapping[str, Any]) -> Collective:
    """The collective that :func:`save` or :func:`load` called with the keywords ``options``
    runs in: rank ``coordinator_rank`` of their ``process_group`` (the world by default)
    coordinates (for callers that pass keywords on, as the checkpoint manager does)."""
    return _Distributed.of(options).collective()


def _check_user_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False, ensure_ascii=False).encode()  # UTF-8, as the manifest
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serializable: {exc}") from exc
    return dict(metadata)


def _attach_base(
    writer: StorageWriter, base: Uri, storage_options: dict[str, Any] | None, slots: DigestSlots | None
) -> None:
    """Make ``writer`` save incrementally against the committed checkpoint ``base``
    (read when the save starts, on every rank); ``slots`` finds remembered digests."""
    text, backend = backend_at(base, storage_options)
    if not (isinstance(writer, LayoutWriter) and isinstance(backend, StoreBackend)):
        raise ValueError(f"base={text!r}: incremental saves need a file-like backend (local files, shm://)")
    if not writer.store.can_adopt():
        raise ValueError(
            f"base={text!r}: {writer.store.location} cannot share files between checkpoints (object "
            "stores cannot), so incremental saves are not supported there; save without base="
        )
    store = backend.open_store(text)
    writer.base_loader = lambda: BaseContent(store, read_manifest(store))
    writer.digest_slots = slots


def _attach_compression(writer: StorageWriter, compression: str | None) -> None:
    """Make ``writer`` compress every item it stores: torchstow's layout writer, also
    under wrappers that forward to it (the fault injector)."""
    if compression is None:
        return
    layout = writer
    while isinstance(layout, ForwardingStorageWriter):
        layout = layout.inner
    if not isinstance(layout, LayoutWriter):
        raise ValueError(
            f"compression={compression!r} needs torchstow's own layout writer (a file-like backend); "
            f"{type(writer).__name__} cannot compress"
        )
    layout.compression = compression


@dataclass(frozen=True, kw_only=True)
class _SaveSettings:
    """What a save writes, and how: the keywords of :func:`save` and :func:`async_save` that
    make its job (besides :class:`_Distributed`'s), passed by name once per call (keyword-only
    and without defaults, so the type checker holds each entry point to every field).

    ``compression`` is checked when they are taken, before anything else; the rest when
    the job is made (:meth:`job`), where a failure on one rank fails every rank as one."""

    uri: Uri | None
    checkpoint_id: Uri | None
    storage_writer: StorageWriter | None
    storage_options: dict[str, Any] | None
    planner: SavePlanner | None
    metadata: Mapping[str, Any] | None
    overwrite: bool
    allow_pickle: bool
    base: Uri | None
    trust_version_counter: bool
    compression: str | None
    format_version: int

    def __post_init__(self) -> None:
        check_compression(self.compression)

    def job(self, slots: DigestSlots) -> SaveJob:
        """What the save writes with: the checked user metadata, the writer, the planner;
        ``slots`` finds remembered digests (with ``trust_version_counter``)."""
        user_metadata = _check_user_metadata(self.metadata)
        writer = dcp_calls.save_target(
            self.uri,
            self.checkpoint_id,
            self.storage_writer,
            lambda location: storage_writer(  # the module's function, not the field
                location, storage_options=self.storage_options, overwrite=self.overwrite
            ),
        )
        set_format_version(writer, self.format_version)
        if self.base is not None:
            _attach_base(
                writer, self.base, self.storage_options, slots if self.trust_version_counter else None
            )
        _attach_compression(writer, self.compression)
        save_planner = dcp_calls.torchstow_save_planner(
            self.planner,
            lambda: DefaultSavePlanner(allow_pickle=self.allow_pickle),
            allow_pickle=self.allow_pickle,
        )
        return SaveJob(writer, save_planner, user_metadata)


def save(
    state_dict: Mapping[str, Any],
    uri: Uri | None = None,
    *,
    checkpoint_id: Uri | None = None,
    storage_writer: StorageWriter | None = None,
    storage_options: dict[str, Any] | None = None,
    planner: SavePlanner | None = None,
    process_group: Any = None,
    coordinator_rank: int = 0,
    no_dist: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    timeout: Timeout | None = None,
    base: Uri | None = None,
    trust_version_counter: bool = False,
    use_collectives: bool = True,
    stats: SaveStats | None = None,
    compression: str | None = None,
    format_version: int = FORMAT_VERSION,
) -> Metadata:
    """Save ``state_dict`` to ``uri``; every rank of the group calls it.

    ``metadata`` is the caller's JSON dict, stored in the manifest (the returned
    manifest's ``user_metadata``, as ``info`` shows it). A committed checkpoint
    at ``uri`` raises CheckpointExistsError unless ``overwrite``. Values that
    only full pickle can store need ``allow_pickle=True``. ``timeout``
    (seconds or a timedelta) bounds how long a rank waits for the others at
    each step (default: the process group's own timeout). With ``base`` (the
    URI of a committed checkpoint on the same backend) tensors whose bytes
    equal the base's are not written again but shared with it (see
    :mod:`torchstow.core.layout.incremental`). With ``trust_version_counter``
    as well, a tensor hashed by an earlier such save in this process whose
    storage, view and ``tensor._version`` are unchanged is not read again:
    its remembered digest is compared with the base's. Writes that bypass the
    version counter (through ``.data``, NumPy, DLPack, raw pointers) then go
    unnoticed, hence opt-in (see docs/performance.md). Returns the committed manifest.

    DCP's keywords work as in ``torch.distributed.checkpoint.save``:
    ``checkpoint_id`` is the same as ``uri``, ``storage_writer`` an explicit
    writer (exactly one of the three names the target), ``planner`` may be
    one of DCP's planners. Stateful values (modules, optimizers, anything
    with ``state_dict()``/``load_state_dict()``) are saved through ``state_dict()``.
    ``use_collectives=False`` (DCP: save without talking to the other ranks)
    works where the save involves one process only; several ranks commit one
    manifest together, so there it raises ValueError.

    ``stats``: a new :class:`SaveStats`, filled with this rank's seconds per
    phase and bytes written (``AsyncSave.stats`` holds the same for an async save).

    ``compression="zstd"`` compresses each stored item on its own (floating-point
    tensors byte-grouped by significance first; see docs/format.md); loads need
    nothing to read it. Another value is a ValueError before anything is written.

    ``format_version``: the manifest format to write, 2 (the default: JSON plus a
    binary chunk table) or 1 (one JSON document, for torchstow versions that
    read only version 1); see docs/format.md.
    """
    settings = _SaveSettings(
        uri=uri,
        checkpoint_id=checkpoint_id,
        storage_writer=storage_writer,
        storage_options=storage_options,
        planner=planner,
        metadata=metadata,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        base=base,
        trust_version_counter=trust_version_counter,
        compression=compression,
        format_version=format_version,
    )
    collective = _Distributed.of(locals()).collective()
    try:
        job = settings.job(own_slot)
        plain = dcp_calls.StatefulView(state_dict).plain
    except Exception as exc:
        stand_in = _FailedWriter(exc)
        _fail_everywhere(exc, collective, lambda: _save_protocol({}, stand_in, collective=collective))
    return _save_protocol(
        plain,
        job.writer,
        planner=job.planner,
        collective=collective,
        user_metadata=job.user_metadata,
        stats=stats,
    )


def load(
    state_dict: Mapping[str, Any],
    uri: Uri | None = None,
    *,
    checkpoint_id: Uri | None = None,
    storage_reader: StorageReader | None = None,
    storage_options: dict[str, Any] | None = None,
    planner: LoadPlanner | None = None,
    process_group: Any = None,
    coordinator_rank: int = 0,
    no_dist: bool | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    cast: bool = False,
    timeout: Timeout | None = None,
    read_once: bool = True,
) -> None:
    """Load the checkpoint at ``uri`` into ``state_dict`` in place; every rank calls it.

    Fills the keys ``state_dict`` holds (keys only the checkpoint has are
    ignored): tensors and DTensors in place (resharded as needed), meta
    tensors replaced by new ones, other leaves replaced, Stateful values
    restored through ``load_state_dict()``. A key the checkpoint lacks raises
    StateDictMismatchError unless ``strict=False``; a dtype difference raises
    unless ``cast=True``. DCP's keywords work as in :func:`save`
    (``storage_reader`` instead of ``storage_writer``). ``timeout`` is as in :func:`save`.
    With ``read_once`` (the default), stored bytes several ranks need are read from
    storage by one of them and sent to the others over the process group.
    """
    collective = _Distributed.of(locals()).collective()
    try:
        reader = dcp_calls.load_target(
            uri,
            checkpoint_id,
            storage_reader,
            functools.partial(_open_reader, storage_options=storage_options),
        )
        view = dcp_calls.StatefulView(state_dict)
        default = functools.partial(
            DefaultLoadPlanner,
            strict=strict,
            allow_pickle=allow_pickle,
            cast=cast,
            before_allocating=functools.partial(require_data, reader),
        )
        planner = dcp_calls.torchstow_load_planner(planner, default, allow_pickle=allow_pickle)
    except Exception as exc:
        failed = _FailedReader(exc)
        _fail_everywhere(
            exc, collective, lambda: _load_protocol({}, failed, collective=collective, read_once=read_once)
        )
    _load_protocol(view.plain, reader, planner=planner, collective=collective, read_once=read_once)
    view.restore()


def async_save(
    state_dict: Mapping[str, Any],
    uri: Uri | None = None,
    *,
    checkpoint_id: Uri | None = None,
    storage_writer: StorageWriter | None = None,
    storage_options: dict[str, Any] | None = None,
    planner: SavePlanner | None = None,
    process_group: Any = None,
    coordinator_rank: int = 0,
    no_dist: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    timeout: Timeout | None = None,
    stager: Stager | None = None,
    base: Uri | None = None,
    trust_version_counter: bool = False,
    async_stager: Stager | None = None,
    async_checkpointer_type: Any = None,
    use_collectives: bool = True,
    compression: str | None = None,
    format_version: int = FORMAT_VERSION,
) -> AsyncSave:
    """Stage ``state_dict``, then save it to ``uri`` in the background; every rank calls it.

    Takes :func:`save`'s options (``timeout`` bounds each wait for the other
    ranks in the background commit, as in :func:`save`). Returns once the state dict is staged (with
    the default stager), so training may go on mutating it; ``.result()``
    waits for the commit. Saves commit in call order; a save first waits for
    the previous save made with the same stager to finish writing, so the
    default keeps one save in flight and one staged copy in memory. Pass a
    ``stager`` (a :class:`DefaultStager` or :class:`StateDictStager`) to stage
    differently; with asynchronous staging, call ``.staged()`` before
    mutating the state dict. Any failure, on any rank, surfaces from
    ``.result()`` as a :class:`CheckpointException` on every rank. With
    ``trust_version_counter`` (and ``base``), the default stager notes each
    tensor's version as it copies it, so digests are reused as in
    :func:`save` (the bytes are still copied, not hashed); other stagers hash.

    DCP's keywords: ``async_stager`` is ``stager`` by DCP's name (DCP's own
    stagers work; give one of the two); ``async_checkpointer_type`` (DCP's
    ``AsyncCheckpointerType`` or its value) is accepted, and either type
    writes in torchstow's save thread; ``use_collectives`` and ``format_version`` are as in :func:`save`.
    """
    settings = _SaveSettings(
        uri=uri,
        checkpoint_id=checkpoint_id,
        storage_writer=storage_writer,
        storage_options=storage_options,
        planner=planner,
        metadata=metadata,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        base=base,
        trust_version_counter=trust_version_counter,
        compression=compression,
        format_version=format_version,
    )
    text = dcp_calls.target_label(uri, checkpoint_id, storage_writer)
    stager = dcp_calls.one_stager(stager, async_stager)
    dcp_calls.check_checkpointer_type(async_checkpointer_type)

    try:
        plain = dcp_calls.StatefulView(state_dict).plain
        expanded: Exception | None = None
    except Exception as exc:  # fails the save on every rank, as a failure in prepare does
        plain, expanded = {}, exc

    def prepare() -> SaveJob:
        if expanded is not None:
            raise expanded
        return settings.job(staged_slot)

    saves = pipeline()
    collective = _Distributed.of(locals()).collective(saves)
    saving = saves.submit(
        plain, text, prepare, collective=collective, stager=stager, track_sources=trust_version_counter
    )
    if getattr(stager, "should_synchronize_after_execute", False):  # DCP's stagers that ask for it
        stager.synchronize_staging()  # type: ignore[union-attr]
    return saving


def _select(metadata: Metadata, keys: Iterable[str] | None) -> list[str]:
    stored = metadata.state_dict_metadata
    if keys is None:
        return list(stored)
    if isinstance(keys, str):
        keys = [keys]
    chosen: dict[str, None] = {}
    unknown = []
    for key in keys:
        if key in stored:
            chosen[key] = None
            continue
        under = [fqn for fqn in stored if fqn.startswith(key + ".")]
        if not under:
            unknown.append(key)
        chosen.update(dict.fromkeys(under))
    if unknown:
        raise KeyError(
            f"the checkpoint has no key or key prefix {', '.join(map(repr, unknown))}; "
            f"it has {len(stored)} keys, e.g. {', '.join(list(stored)[:5])}"
        )
    return list(chosen)


def read(
    uri: Uri,
    *,
    keys: Iterable[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    mmap: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Materialize the checkpoint at ``uri`` (or only ``keys``) as a nested dict
    of full CPU tensors, in this process alone.

    ``keys`` are fully-qualified keys or prefixes of them (``"model"``
    selects every key under ``model.``). With ``mmap=True`` (local files and
    ``shm://`` only) tensors map the data files instead of copying them:
    writing to one copies the pages it touches, the files never change
    (see :mod:`torchstow.core.layout.mapped`); compressed tensors are
    decompressed into memory instead. ``verify=False`` skips the
    block checksums, on copied and on mapped reads alike (mapping then costs
    the same whatever the size); the manifest and the file sizes are still checked.
    """
    text, backend = backend_at(uri, storage_options)
    if not verify and isinstance(backend, StoreBackend):
        backend.verify_checksums = False
    reader = backend.storage_reader(text)
    metadata = reader.read_metadata()
    selected = _select(metadata, keys)
    require_data(reader, metadata, selected)  # before allocating what the manifest claims
    mapped: dict[str, Any] = {}
    if mmap:
        store = backend.open_store(text) if isinstance(backend, StoreBackend) else None
        mapped = map_checkpoint(store, text, metadata, selected, verify=verify)
    wanted = {fqn: None for fqn in selected if fqn not in mapped}
    flat = materialize(reader, metadata, wanted, allow_pickle=allow_pickle)
    if mapped:
        flat = {fqn: mapped[fqn] if fqn in mapped else flat[fqn] for fqn in selected}
    return build_nested(flat, metadata.planner_data, metadata.state_dict_metadata)
