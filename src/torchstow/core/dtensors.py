"""DTensors without importing them: detection, and local views of state dicts.

torch.distributed.tensor is only looked up where it is already loaded (no
DTensor can exist otherwise), which keeps its import cost off the path of
state dicts without DTensors.

A per-rank copy of a state dict (one rank's checkpoint, a replica sent to a
partner) holds each DTensor's local shard only; :func:`local_view` gives that
view without copying any tensor data.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["dtensor_type", "is_dtensor", "local_view", "materialize"]


def dtensor_type() -> type | None:
    """The DTensor class, if torch.distributed.tensor is loaded (else no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a torch.distributed.tensor.DTensor."""
    cls = dtensor_type()
    return cls is not None and isinstance(value, cls)


def local_view(obj: Any) -> Any:
    """``obj`` with every DTensor replaced by its local shard (no data copied).

    Mappings become dicts, lists and tuples (namedtuples too) are rebuilt;
    other values are returned as they are. A structure without DTensors is
    returned unchanged.
    """
    if dtensor_type() is None:
        return obj
    return _local(obj)


def _local(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        if is_dtensor(obj):
            with torch.no_grad():
                return obj.to_local()  # type: ignore[attr-defined]
        return obj
    if isinstance(obj, Mapping):
        return {key: _local(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_local(value) for value in obj]
    if isinstance(obj, tuple):
        items = [_local(value) for value in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    return obj


def materialize(value: torch.Tensor) -> torch.Tensor:
    """A new, uninitialized tensor in place of one on the meta device.

    A plain tensor comes to the CPU; a DTensor keeps its mesh, placements
    and global shape, with a local shard on the mesh's device.
    """
    cls: Any = dtensor_type()
    if cls is not None and isinstance(value, cls):
        dtensor: Any = value
        with torch.no_grad():
            local = dtensor.to_local()
        mesh = dtensor.device_mesh
        new_local = torch.empty_like(local, device=mesh.device_type)
        out = cls.from_local(
            new_local, mesh, dtensor.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    else:
        out = torch.empty_like(value, device="cpu")
    return out.requires_grad_(value.requires_grad) if value.is_leaf else out
