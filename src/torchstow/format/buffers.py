"""Zero-copy byte views of tensor memory (without NumPy, which torchstow does not need)."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["tensor_bytes"]

_EMPTY = memoryview(b"")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    The view, and every slice of it, keeps ``tensor`` (so its memory) alive, as a view
    of a ``bytes`` object keeps the bytes: a store may hold the pieces it was given to
    send them later without a copy.
    """
    nbytes = tensor.nbytes
    if nbytes == 0:
        return _EMPTY
    if not tensor.is_cpu or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    memory = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    memory.tensor = tensor  # type: ignore[attr-defined]  # (from_address keeps no reference)
    return memoryview(memory)
