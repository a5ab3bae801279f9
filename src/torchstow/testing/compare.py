"""Comparing nested state dicts bit for bit: the one comparison the kit, the tests and
the demo share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["assert_same_state", "state_differences"]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (on the CPU), so NaN payloads, -0.0 and every dtype compare exactly."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _describe(value: Any) -> str:
    return type(value).__name__


def state_differences(a: Any, b: Any, *, ordered: bool = True) -> list[str]:
    """Every place where two nested state dicts differ, one line each (``[]`` when equal).

    Tensors must agree in dtype, shape and every bit (NaN payloads and ``-0.0``
    included; device, strides and tensor subclass are not compared).
    Containers must be of the same type with the same keys or length; with
    ``ordered`` (the default) mappings must also list their keys in the same
    order. Other values compare with ``==`` (two float NaNs are equal).
    A line starts with the path of the value, such as ``optim.state.0.exp_avg``.
    """
    found: list[str] = []
    _walk(a, b, "", ordered, found)
    return found


def assert_same_state(a: Any, b: Any, *, ordered: bool = True) -> None:
    """Assert two nested state dicts are identical (see :func:`state_differences`).

    The :class:`AssertionError` lists every difference, not only the first.
    """
    differences = state_differences(a, b, ordered=ordered)
    if differences:
        shown = "\n  ".join(differences[:20])
        more = f"\n  ... and {len(differences) - 20} more" if len(differences) > 20 else ""
        raise AssertionError(f"state dicts differ in {len(differences)} place(s):\n  {shown}{more}")


def _walk(a: Any, b: Any, path: str, ordered: bool, found: list[str]) -> None:
    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            found.append(f"{where}: {_describe(a)} != {_describe(b)}")
        elif a.dtype != b.dtype:
            found.append(f"{where}: dtype {a.dtype} != {b.dtype}")
        elif a.shape != b.shape:
            found.append(f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        elif not torch.equal(_bits(a), _bits(b)):
            found.append(f"{where}: values differ")
        return
    if type(a) is not type(b):
        found.append(f"{where}: {_describe(a)} != {_describe(b)}")
        return
    if isinstance(a, Mapping):
        if list(a) != list(b) and (ordered or set(a) != set(b)):
            missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]
            if missing or extra:
                found.append(f"{where}: keys only in the first {missing}, only in the second {extra}")
            else:
                found.append(f"{where}: key order {list(a)} != {list(b)}")
        for key in a:
            if key in b:
                _walk(a[key], b[key], f"{path}.{key}" if path else str(key), ordered, found)
    elif isinstance(a, list | tuple):
        if len(a) != len(b):
            found.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _walk(x, y, f"{path}.{i}" if path else str(i), ordered, found)
    elif isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return
    elif not bool(a == b):
        found.append(f"{where}: {a!r} != {b!r}")
