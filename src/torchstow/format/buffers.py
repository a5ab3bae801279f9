"""Zero-copy byte views of tensor memory (without NumPy, which torchstow does not need)."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["tensor_bytes"]

_EMPTY = memoryview(b"")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    The view does not keep ``tensor`` alive: the caller must hold a reference
    for as long as the view is used.
    """
    nbytes = tensor.nbytes
    if nbytes == 0:
        return _EMPTY
    if not tensor.is_cpu or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr()))
