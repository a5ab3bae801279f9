"""Zero-copy byte views of tensor memory."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["as_host_bytes", "tensor_bytes"]

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


def as_host_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """Bring a tensor to contiguous CPU memory (copying only when it must) and view it.

    Returns the tensor whose memory backs the view, which the caller keeps alive.
    """
    # A lazily conjugated or negated view keeps its flag beside unchanged memory:
    # materialize it, or the raw bytes would be saved without it.
    tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_cpu:
        tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor, tensor_bytes(tensor)
