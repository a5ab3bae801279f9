"""Digests reused while a tensor's version counter stands still (``trust_version_counter=True``).

An incremental save with ``trust_version_counter=True`` remembers, in this
process, the BLAKE3 digest of each tensor item it hashed: on the item's
untyped storage (an attribute of its Python object, which goes when the
storage goes; no tensor is kept alive), under the item's view of it (the
storage's data pointer and size, storage offset, shape, stride, dtype,
conjugate and negative bits) and its version: the pair of the
state-dict value's ``_version`` and the item tensor's (they differ for a
DTensor, whose in-place operations bump the DTensor's counter and not its
local tensor's, while writes to the local tensor bump only the latter). Only
the latest version of each view is kept. A later such save of the same view
at the same version takes the digest from here instead of reading the bytes.

PyTorch bumps the version counter on every in-place operation, optimizer steps
included; writes through ``.data``, NumPy views, DLPack, raw pointers or
another tensor made over the same memory (``set_``, ``frombuffer``, or a
swap with ``.data =`` whose other side writes it meanwhile) do not, which is
why the reuse is opt-in. torchstow's own raw writes into a tensor (a
load in place) call :func:`forget`.

An asynchronous save writes a staged copy: with source tracking on, the
stager notes the source's slot at the moment it copies it
(:func:`note_staged`), and the writer finds it by the staged tensor
(:func:`staged_slot`). A staged buffer refilled by a later staging pass loses
its notes, and any digest remembered for tensors over it, first
(:func:`forget_staged`): a staged copy saved as it is by a save of its own
would otherwise look unchanged, its new tensors starting at version 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from torchstow.core.dtensors import dtensor_type

__all__ = ["DigestSlot", "forget", "forget_staged", "note_staged", "own_slot", "staged_slot"]

_View = tuple[Any, ...]


class _Digests:
    """The digests remembered for views of one storage: view -> (version, digest)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[_View, tuple[tuple[int, int], str]] = {}


# Kept as attributes of the storages' Python objects, which PyTorch keeps as long as
# the storage lives: the records go with their storage, and a lookup costs a getattr.
_DIGESTS = "_torchstow_digests"  # on a storage: its _Digests
_NOTES = "_torchstow_staged_from"  # on a staging buffer: {view: DigestSlot | None}
_used = False  # whether any digest was remembered in this process


class DigestSlot(NamedTuple):
    """Where one tensor item's digest is remembered: its storage's record, its view, its version."""

    record: _Digests
    view: _View
    version: tuple[int, int]

    def digest(self) -> str | None:
        """The digest remembered for this view at this version, if any."""
        found = self.record.entries.get(self.view)
        return found[1] if found is not None and found[0] == self.version else None

    def remember(self, digest: str) -> None:
        """Remember ``digest`` for this view at this version (replacing older versions)."""
        self.record.entries[self.view] = (self.version, digest)


def _view_of(tensor: torch.Tensor) -> tuple[torch.UntypedStorage, _View] | None:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    view = (
        storage.data_ptr(),
        storage.nbytes(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.is_conj(),
        tensor.is_neg(),
    )
    return storage, view


def _trackable(value: Any) -> bool:
    """Plain tensors, parameters and DTensors: other subclasses may hold their data elsewhere."""
    if type(value) in (torch.Tensor, torch.nn.Parameter):
        return True
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def own_slot(tensor: torch.Tensor, value: Any) -> DigestSlot | None:
    """The slot of ``tensor``'s own bytes, an item of the state-dict value ``value``
    (itself, or the DTensor it is the local shard of); None where either has no
    version counter (inference-mode tensors), or ``tensor`` no single storage."""
    global _used
    if not (_trackable(value) and type(tensor) in (torch.Tensor, torch.nn.Parameter)):
        return None
    found = _view_of(tensor)
    if found is None:
        return None
    try:
        version = (value._version, tensor._version)
    except RuntimeError:  # inference tensors track no version
        return None
    storage, view = found
    record = getattr(storage, _DIGESTS, None)
    if record is None:  # two threads may both make one: a digest lost, nothing wrong
        record = _Digests()
        setattr(storage, _DIGESTS, record)
        _used = True
    return DigestSlot(record, view, version)


def forget(tensor: torch.Tensor) -> None:
    """Drop every digest remembered for ``tensor``'s storage: its bytes are being
    written without its version counter moving."""
    if not _used:
        return
    found = _view_of(tensor)
    if found is not None and getattr(found[0], _DIGESTS, None) is not None:
        setattr(found[0], _DIGESTS, None)


def forget_staged(staged: torch.UntypedStorage) -> None:
    """Drop what is remembered about a staging buffer just filled again: its notes,
    and the digests of tensors over it (a staged copy may be saved as it is)."""
    for name in (_NOTES, _DIGESTS):
        if getattr(staged, name, None) is not None:
            setattr(staged, name, None)


def note_staged(source: torch.Tensor, staged: torch.Tensor, value: Any) -> None:
    """Note that ``staged`` now holds a copy of ``source``'s bytes (same view),
    ``source`` being the state-dict value ``value`` or its local shard (a
    DTensor's note replaces the one its local tensor made)."""
    slot = own_slot(source, value)
    found = _view_of(staged)
    if found is None:
        return
    storage, view = found
    views = getattr(storage, _NOTES, None)
    if views is None:
        views = {}
        setattr(storage, _NOTES, views)
    noted = views.setdefault(view, slot)
    if value is not source:
        views[view] = slot
    elif noted != slot:  # two sources with separate counters: trust neither
        views[view] = None


def staged_slot(tensor: torch.Tensor, value: Any = None) -> DigestSlot | None:
    """The slot of the source a staged ``tensor`` was copied from, if the stager
    noted it (``value``, the staged state-dict value, is not needed)."""
    found = _view_of(tensor)
    if found is None:
        return None
    storage, view = found
    views = getattr(storage, _NOTES, None)
    return views.get(view) if views is not None else None
