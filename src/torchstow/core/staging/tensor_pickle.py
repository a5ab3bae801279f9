"""Pickling a state dict's structure while its tensors travel some other way.

Containers and non-tensor leaves are pickled as usual; every tensor met on the
way becomes a :class:`TensorView`: which storage it views (a key the caller
chooses: a shared-memory segment, the n-th storage of an exchange) and how
(dtype, size, stride, offset). On the other side each view is rebuilt over
the storage the caller maps its key to, so tensors that shared a storage
share one again. Tensor bytes are never pickled. Classes are pickled by
reference, as pickle always does, so containers must be importable where the
data is loaded.
"""

from __future__ import annotations

import io
import itertools
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torchstow.core.dtensors import dtensor_type
from torchstow.core.planning.local_shards import ShardPlacement, mark_shard

__all__ = ["TensorView", "dumps_tensor_views", "loads_tensor_views"]


@dataclass(frozen=True)
class TensorView:
    """A tensor of the pickled state dict: which storage it views, and how.

    ``tensor`` numbers the distinct tensors (one that appears twice is one
    view); ``spec`` is a DTensor's spec when DTensors are kept, its
    :class:`ShardPlacement` when shards are placed, else None.
    """

    tensor: int
    storage: Any
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool
    spec: Any = None


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


def dumps_tensor_views(
    obj: Any,
    storage_key: Callable[[torch.Tensor], Any],
    *,
    keep_dtensors: bool = False,
    dtensor_placement: Callable[[torch.Tensor], ShardPlacement] | None = None,
) -> bytes:
    """Pickle ``obj`` with each distinct tensor as a :class:`TensorView`.

    ``storage_key(tensor)`` names the storage the view refers to (it may
    raise to refuse a tensor). A DTensor becomes a view of its local shard,
    and with ``keep_dtensors`` it keeps its spec, to come back as a DTensor;
    with ``dtensor_placement`` it comes back as its local shard marked with
    the placement that function gives (:mod:`torchstow.core.planning.local_shards`).
    """
    counter = itertools.count()
    dtensor = dtensor_type()

    def view(tensor: torch.Tensor) -> TensorView:
        requires_grad = tensor.requires_grad
        spec = None
        if dtensor is not None and isinstance(tensor, dtensor):
            if keep_dtensors:
                spec = tensor._spec  # type: ignore[attr-defined]
            elif dtensor_placement is not None:
                spec = dtensor_placement(tensor)
            tensor = tensor._local_tensor  # type: ignore[attr-defined]
        return TensorView(
            next(counter),
            storage_key(tensor),
            tensor.dtype,
            tuple(tensor.size()),
            tuple(tensor.stride()),
            int(tensor.storage_offset()),
            requires_grad,
            spec,
        )

    buffer = io.BytesIO()
    _Pickler(buffer, view).dump(obj)
    return buffer.getvalue()


def loads_tensor_views(data: bytes, storage: Callable[[Any], torch.UntypedStorage]) -> Any:
    """Unpickle what :func:`dumps_tensor_views` wrote, each view over ``storage(key)``."""
    built: dict[int, torch.Tensor] = {}

    def tensor(ref: TensorView) -> torch.Tensor:
        value = built.get(ref.tensor)
        if value is None:
            value = torch.empty(0, dtype=ref.dtype).set_(
                storage(ref.storage), ref.offset, ref.size, ref.stride
            )
            if isinstance(ref.spec, ShardPlacement):
                mark_shard(value, ref.spec)
                if ref.requires_grad:
                    value.requires_grad_(True)
            elif ref.spec is not None:
                dtensor = dtensor_type()
                assert dtensor is not None  # unpickling the spec imported it
                value = dtensor(value, ref.spec, requires_grad=ref.requires_grad)
            elif ref.requires_grad:
                value.requires_grad_(True)
            built[ref.tensor] = value
        return value

    return _Unpickler(io.BytesIO(data), tensor).load()
