"""Pickling a state dict's structure while its tensors travel some other way.

Containers and non-tensor leaves are pickled as usual; every tensor met on the
way is handed to a callback that returns a small, picklable reference (where
the bytes are: a shared-memory segment, the n-th message of an exchange), and
on the other side a second callback turns each reference back into a tensor.
Tensor bytes are never pickled. Classes are pickled by reference, as pickle
always does, so containers must be importable where the data is loaded.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["dumps_with_tensors", "loads_with_tensors"]


class _Pickler(pickle.Pickler):
    def __init__(self, buffer: io.BytesIO, on_tensor: Callable[[torch.Tensor], Any]) -> None:
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self._on_tensor = on_tensor
        self._refs: dict[int, Any] = {}
        self._keep: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        ref = self._refs.get(id(obj))
        if ref is None:
            ref = self._refs[id(obj)] = self._on_tensor(obj)
            self._keep.append(obj)  # ids stay unique while the tensor lives
        return ref


class _Unpickler(pickle.Unpickler):
    def __init__(self, buffer: io.BytesIO, on_ref: Callable[[Any], torch.Tensor]) -> None:
        super().__init__(buffer)
        self._on_ref = on_ref

    def persistent_load(self, pid: Any) -> Any:
        return self._on_ref(pid)


def dumps_with_tensors(obj: Any, on_tensor: Callable[[torch.Tensor], Any]) -> bytes:
    """Pickle ``obj``, replacing each distinct tensor by ``on_tensor(tensor)``."""
    buffer = io.BytesIO()
    _Pickler(buffer, on_tensor).dump(obj)
    return buffer.getvalue()


def loads_with_tensors(data: bytes, on_ref: Callable[[Any], torch.Tensor]) -> Any:
    """Unpickle what :func:`dumps_with_tensors` wrote, rebuilding tensors with ``on_ref``.

    ``on_ref`` is called once per occurrence; it should return the same tensor
    for equal references if the caller wants aliasing kept.
    """
    return _Unpickler(io.BytesIO(data), on_ref).load()
