"""One tensor under several keys of a state dict being loaded (tied weights).

A model with tied weights (an embedding shared with its output layer) puts
one tensor under two keys, and a checkpoint of it holds the same values
twice. Loading reads the first key into the tensor and every other key into
a scratch copy, then checks the copies agree with it byte for byte. Keys
whose stored checksums already prove different values are refused before
anything is read; either way the error says the keys share one tensor, not
that the checkpoint is corrupted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchstow.errors import StateDictMismatchError
from torchstow.format.manifest import Metadata, MetadataIndex

__all__ = ["AliasTracker"]

_Ident = tuple[Any, ...]


def _has_data(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has data of its own that another key could share."""
    return tensor.layout == torch.strided and not tensor.is_meta and tensor.numel() != 0


def _identity(tensor: torch.Tensor) -> _Ident:
    """What makes two tensors the same view of memory: where its first element is,
    shape, strides, dtype and device."""
    return (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


def _differ(metadata: Metadata, fqn: str, other: str, offsets: torch.Size) -> bool:
    """Whether the stored checksums prove the two keys' chunk at ``offsets`` differ."""
    locations = metadata.storage_data
    if not isinstance(locations, Mapping):
        return False
    mine = locations.get(MetadataIndex(fqn, offsets))
    theirs = locations.get(MetadataIndex(other, offsets))
    if mine is None or theirs is None or mine.block_size != theirs.block_size:
        return False
    return bool(mine.length == theirs.length and mine.checksums != theirs.checksums)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat_a = a.detach().contiguous().view(-1).view(torch.uint8)
    flat_b = b.detach().contiguous().view(-1).view(torch.uint8)
    return torch.equal(flat_a, flat_b)


class AliasTracker:
    """Finds the keys of a load whose targets are one tensor and checks they load alike."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        # Keys by the address of their first element; the rest of the identity is
        # compared only when two keys start at one address (most tensors own theirs).
        self._first: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._checks: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
        self._pending = 0

    def target(self, fqn: str, offsets: torch.Size, local: torch.Tensor) -> torch.Tensor:
        """Where ``fqn``'s chunk at ``offsets`` is read: ``local``, or a scratch
        tensor when an earlier key already reads into the same memory."""
        if not _has_data(local):
            return local
        ptr = local.data_ptr()
        earlier = self._first.get(ptr)
        if earlier is None:
            self._first[ptr] = [(fqn, local)]
            return local
        ident = _identity(local)
        same = next((pair for pair in earlier if _identity(pair[1]) == ident), None)
        if same is None:
            earlier.append((fqn, local))
            return local
        other, primary = same
        if _differ(self.metadata, fqn, other, offsets):
            raise StateDictMismatchError(
                f"{other!r} and {fqn!r} are one tensor in the state dict (tied), but the checkpoint holds "
                "different values for them (their checksums differ); give each key its own tensor, or "
                "leave one of them out of the state dict",
                mismatched=[fqn],
            )
        scratch = torch.empty_like(local)
        self._checks.append((other, fqn, primary, scratch))
        return scratch

    def expect(self, count: int) -> None:
        """The number of tensor items the load will commit."""
        self._pending = count

    def committed(self) -> None:
        """One tensor item is in place; after the last, compare the tied keys."""
        self._pending -= 1
        if self._pending:
            return
        for first, other, primary, scratch in self._checks:
            if not _same_bytes(primary, scratch):
                raise StateDictMismatchError(
                    f"{first!r} and {other!r} are one tensor in the state dict (tied), but the checkpoint "
                    "holds different values for them; give each key its own tensor, or leave one of "
                    "them out of the state dict",
                    mismatched=[other],
                )
