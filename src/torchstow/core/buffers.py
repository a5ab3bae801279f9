"""Zero-copy byte views of tensor memory, and block checksums over them."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import crc32c
import torch

__all__ = ["BlockVerifier", "as_host_bytes", "tensor_bytes"]

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
    if not tensor.is_cpu:
        tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor, tensor_bytes(tensor)


class BlockVerifier:
    """Checks an item's bytes against its per-block crc32c as they arrive, in order.

    The bytes fed start at block ``first_block`` and must end at a block
    boundary or at the item's end.
    """

    __slots__ = ("block", "block_size", "crc", "expected", "filled")

    def __init__(self, first_block: int, expected: Sequence[int], block_size: int) -> None:
        self.block = first_block
        self.expected = expected
        self.block_size = block_size
        self.crc = 0
        self.filled = 0

    def feed(self, data: memoryview) -> int | None:
        """Take the next bytes; the index of a block that failed, else None."""
        pos = 0
        size = len(data)
        while pos < size:
            take = min(self.block_size - self.filled, size - pos)
            chunk = data if take == size else data[pos : pos + take]
            self.crc = crc32c.crc32c(chunk, self.crc)
            self.filled += take
            pos += take
            if self.filled == self.block_size:
                if self.crc != self.expected[self.block]:
                    return self.block
                self.block += 1
                self.crc = 0
                self.filled = 0
        return None

    def end(self) -> int | None:
        """Check the final, partial block; the index of a failed block, else None."""
        if self.filled and self.crc != self.expected[self.block]:
            return self.block
        return None
