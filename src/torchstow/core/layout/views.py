"""Zero-copy byte views of tensor memory."""

from __future__ import annotations

import torch

from torchstow.format.buffers import tensor_bytes

__all__ = ["as_host_bytes", "tensor_bytes"]


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
