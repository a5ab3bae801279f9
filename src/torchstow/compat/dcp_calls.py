"""DCP's calling conventions for ``torchstow.save``/``load``/``async_save``.

``torch.distributed.checkpoint`` names the target with ``checkpoint_id`` or
a ``storage_writer``/``storage_reader`` object, and lets any value with
``state_dict()``/``load_state_dict()`` (a :class:`~torch.distributed.checkpoint.stateful.Stateful`)
stand in the state dict. This module turns those conventions into what the
core protocol takes: one storage object, a planner, and a plain state dict
(with a way to put what was loaded back into the caller's objects).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch

from torchstow.core.planning import LoadPlanner, SavePlanner
from torchstow.core.protocol.collective import Collective
from torchstow.core.storage.interfaces import StorageReader, StorageWriter

__all__ = [
    "StatefulView",
    "check_checkpointer_type",
    "is_stateful",
    "load_target",
    "one_stager",
    "save_target",
    "target_label",
    "torchstow_load_planner",
    "torchstow_save_planner",
    "without_collectives",
]

Uri = str | os.PathLike[str]


def _one_target(kind: str, uri: Uri | None, checkpoint_id: Uri | None, storage: Any) -> None:
    given = [
        name
        for name, value in (("uri", uri), ("checkpoint_id", checkpoint_id), (kind, storage))
        if value is not None
    ]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise ValueError(
            f"name the checkpoint with exactly one of uri, checkpoint_id or {kind}; got {what}"
            + (
                f" (to point a {kind} at a location, give the location to its constructor)"
                if len(given) > 1 and kind in given
                else ""
            )
        )


def target_label(uri: Uri | None, checkpoint_id: Uri | None, storage_writer: Any) -> str:
    """Check that exactly one of the three names a save's target; how to name it in messages."""
    _one_target("storage_writer", uri, checkpoint_id, storage_writer)
    location = uri if uri is not None else checkpoint_id
    if location is not None:
        return os.fspath(location)
    return str(getattr(storage_writer, "checkpoint_id", None) or type(storage_writer).__name__)


def _target(
    kind: str,
    base: type[Any],
    uri: Uri | None,
    checkpoint_id: Uri | None,
    storage: Any,
    open_storage: Callable[[Uri], Any],
) -> Any:
    _one_target(f"storage_{kind}", uri, checkpoint_id, storage)
    if storage is None:
        location = uri if uri is not None else checkpoint_id
        assert location is not None
        return open_storage(location)
    inner = getattr(storage, f"torchstow_{kind}", None)  # one made by dcp_storage_writer/reader
    if isinstance(inner, base):
        return inner
    if not isinstance(storage, base):
        call = "dcp.save" if kind == "writer" else "dcp.load"
        raise TypeError(
            f"storage_{kind} must be a torchstow Storage{kind.title()} (torchstow.storage_{kind}(uri), "
            f"a subclass of torchstow.spi.Storage{kind.title()}, or torchstow.dcp_storage_{kind}(uri)), got "
            f"{type(storage).__name__}; a torch.distributed.checkpoint {kind} goes to {call}"
        )
    return storage


def save_target(
    uri: Uri | None,
    checkpoint_id: Uri | None,
    storage_writer: Any,
    open_writer: Callable[[Uri], StorageWriter],
) -> StorageWriter:
    """The storage writer a save names: opened from ``uri``/``checkpoint_id``, or the given one.

    ``storage_writer`` may be a torchstow writer or one made by
    :func:`torchstow.dcp_storage_writer`; a stock DCP writer is refused with
    a pointer to what works instead.
    """
    writer: StorageWriter = _target("writer", StorageWriter, uri, checkpoint_id, storage_writer, open_writer)
    return writer


def load_target(
    uri: Uri | None,
    checkpoint_id: Uri | None,
    storage_reader: Any,
    open_reader: Callable[[Uri], StorageReader],
) -> StorageReader:
    """The storage reader a load names (see :func:`save_target`)."""
    reader: StorageReader = _target("reader", StorageReader, uri, checkpoint_id, storage_reader, open_reader)
    return reader


def torchstow_save_planner(
    planner: Any, default: Callable[[], SavePlanner], *, allow_pickle: bool = False
) -> SavePlanner:
    """``planner`` as a torchstow planner: DCP's planners run through an adapter."""
    if planner is None:
        return default()
    if isinstance(planner, SavePlanner):
        return planner
    from torchstow.compat.dcp_planners import DcpSavePlannerAdapter, is_dcp_save_planner

    if is_dcp_save_planner(planner):
        return DcpSavePlannerAdapter(planner, allow_pickle=allow_pickle)
    raise TypeError(f"planner must be a torchstow or DCP SavePlanner, got {type(planner).__name__}")


def torchstow_load_planner(
    planner: Any, default: Callable[[], LoadPlanner], *, allow_pickle: bool = False
) -> LoadPlanner:
    """``planner`` as a torchstow planner: DCP's planners run through an adapter."""
    if planner is None:
        return default()
    if isinstance(planner, LoadPlanner):
        return planner
    from torchstow.compat.dcp_planners import DcpLoadPlannerAdapter, is_dcp_load_planner

    if is_dcp_load_planner(planner):
        return DcpLoadPlannerAdapter(planner, allow_pickle=allow_pickle)
    raise TypeError(f"planner must be a torchstow or DCP LoadPlanner, got {type(planner).__name__}")


def without_collectives(collective: Collective, use_collectives: bool) -> Collective:
    """``collective``, checked against DCP's ``use_collectives=False`` (no talking to other ranks)."""
    if not use_collectives and collective.world_size > 1:
        raise ValueError(
            f"use_collectives=False: this save involves {collective.world_size} ranks, and torchstow "
            "commits one manifest for all of them, which needs them to agree; keep the collectives, "
            "or save each rank alone (no_dist=True) to a location of its own"
        )
    return collective


def one_stager(stager: Any, async_stager: Any) -> Any:
    """The stager an asynchronous save names, by torchstow's keyword or DCP's (``async_stager``)."""
    if stager is not None and async_stager is not None:
        raise ValueError("give the stager as stager= or as async_stager= (DCP's name), not both")
    return stager if stager is not None else async_stager


def check_checkpointer_type(kind: Any) -> None:
    """Accept DCP's ``async_checkpointer_type``: an ``AsyncCheckpointerType`` or its value."""
    if kind is None:
        return
    value = getattr(kind, "value", kind)
    if value not in ("thread", "process"):
        raise ValueError(
            f"async_checkpointer_type must be DCP's AsyncCheckpointerType (THREAD or PROCESS), got {kind!r}"
        )


def is_stateful(value: Any) -> bool:
    """Whether ``value`` is saved through ``state_dict()`` and loaded through
    ``load_state_dict()`` (modules, optimizers, schedulers, user objects)."""
    if isinstance(value, torch.Tensor | Mapping | type | list | tuple | str | bytes):
        return False
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types, told apart cheaply


class StatefulView:
    """The state dict with every Stateful replaced by its ``state_dict()``, at any depth.

    :attr:`plain` is what the protocol saves or loads into: containers that
    hold a Stateful are copied, everything else is shared with the caller's
    state dict (no tensor is ever copied). After a load, :meth:`restore`
    hands each Stateful its loaded state through ``load_state_dict()`` (in
    place) and assigns the loaded values back into the caller's containers:
    at the top level every key but a Stateful's, as DCP does.
    """

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self.original = state_dict
        self._raw: dict[int, Any] = {}
        self.plain = self._expand(state_dict)[0]

    def _expand(self, value: Any) -> tuple[Any, bool]:
        if type(value) in _TENSOR_TYPES:  # the common leaf: neither Stateful nor a container
            return value, False
        if is_stateful(value):
            raw = value.state_dict()
            self._raw[id(value)] = raw
            return self._expand(raw)[0], True
        if isinstance(value, Mapping):
            pairs = [(key, self._expand(child)) for key, child in value.items()]
            if any(found for _, (_, found) in pairs):
                return {key: plain for key, (plain, _) in pairs}, True
            return value, False
        if isinstance(value, list | tuple):
            expanded = [self._expand(child) for child in value]
            if any(found for _, found in expanded):
                items = [plain for plain, _ in expanded]
                return (_rebuild(value, items) if isinstance(value, tuple) else items), True
        return value, False

    def restore(self) -> None:
        """After a load into :attr:`plain`: put what was loaded into the caller's objects.

        As ``dcp.load`` does at the top level: a Stateful value is loaded in
        place and its key not assigned; every other key is assigned the
        loaded value (``state_dict[key] = ...``).
        """
        original, plain = self.original, self.plain
        for key in list(original):
            value = original[key]
            loaded = plain[key] if plain is original else self._restore(value, plain[key])
            if isinstance(original, MutableMapping) and not is_stateful(value):
                original[key] = loaded

    def _restore(self, original: Any, plain: Any) -> Any:
        """The value to keep where ``original`` was, once ``plain`` is loaded."""
        if is_stateful(original):
            raw = self._raw[id(original)]
            original.load_state_dict(self._restore(raw, plain))
            return original
        if plain is original:
            return original
        if isinstance(original, MutableMapping):
            for key in list(original):
                if key in plain:
                    original[key] = self._restore(original[key], plain[key])
            return original
        if isinstance(original, list):
            for i, item in enumerate(original):
                original[i] = self._restore(item, plain[i])
            return original
        if isinstance(original, tuple):
            return _rebuild(original, [self._restore(o, p) for o, p in zip(original, plain, strict=True)])
        return plain


def _rebuild(original: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    if hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    return type(original)(items)
