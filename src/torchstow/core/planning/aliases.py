"""One tensor under several keys of a state dict being loaded (tied weights).

A model with tied weights (an embedding shared with its output layer) puts
one tensor under two keys, and a checkpoint of it holds the same values
twice. Loading reads the first key into the tensor and every other key into
a scratch copy, then checks the copies agree with it byte for byte. Keys
whose stored checksums already prove different values are refused before
anything is read; either way the error says the keys share one tensor, not
that the checkpoint is corrupted.

Keys whose tensors are different views of overlapping memory (``t`` and
``t[::2]``, ``t.view(2, 3).t()``) are read into scratch copies too (all but
the first to claim the memory), which are then written over it in key order;
every key must then show the values it loaded, else the load fails the same
way. Without this the reads would land in each other's memory: a key could
silently show another key's values, or its verification fail as corruption.
"""

from __future__ import annotations

import bisect
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


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[start, end)`` of the bytes ``tensor`` may touch (strides are never negative)."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.nbytes
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


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
        # Memory claimed by keys read in place, per storage: sorted, disjoint (start, end, key, tensor).
        self._claimed: dict[tuple[int, int], list[tuple[int, int, str, torch.Tensor]]] = {}
        # Keys read into scratch because their memory overlaps others': (key, tensor, scratch, others).
        self._overlaps: list[tuple[str, torch.Tensor, torch.Tensor, list[tuple[str, torch.Tensor]]]] = []
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
            return self._claim(fqn, local)
        ident = _identity(local)
        same = next((pair for pair in earlier if _identity(pair[1]) == ident), None)
        if same is None:
            earlier.append((fqn, local))
            return self._claim(fqn, local)
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

    def _claim(self, fqn: str, local: torch.Tensor) -> torch.Tensor:
        """``local`` where no earlier key's memory overlaps it, else a scratch tensor."""
        start, end = _span(local)
        storage = start - int(local.storage_offset()) * local.element_size()  # where its storage starts
        key = (local.get_device(), storage)
        claimed = self._claimed.get(key)
        if claimed is None:  # the common case: the first key in its storage
            self._claimed[key] = [(start, end, fqn, local)]
            return local
        at = bisect.bisect_left(claimed, (start,))
        # claimed is disjoint: only the span just before ``at`` can start earlier and overlap
        i = at - 1 if at and claimed[at - 1][1] > start else at
        others = []
        while i < len(claimed) and claimed[i][0] < end:
            others.append((claimed[i][2], claimed[i][3]))
            i += 1
        if not others:
            claimed.insert(at, (start, end, fqn, local))
            return local
        scratch = torch.empty_like(local)
        self._overlaps.append((fqn, local, scratch, others))
        return scratch

    def expect(self, count: int) -> None:
        """The number of tensor items the load will commit."""
        self._pending = count

    def committed(self) -> None:
        """One tensor item is in place; after the last, compare the tied keys."""
        self._pending -= 1
        if self._pending:
            return
        self._place_overlaps()
        for first, other, primary, scratch in self._checks:
            if not _same_bytes(primary, scratch):
                raise StateDictMismatchError(
                    f"{first!r} and {other!r} are one tensor in the state dict (tied), but the checkpoint "
                    "holds different values for them; give each key its own tensor, or leave one of "
                    "them out of the state dict",
                    mismatched=[other],
                )

    def _place_overlaps(self) -> None:
        """Write the keys read into scratch over their overlapping memory, in key order;
        then every key involved must still show the values it loaded."""
        if not self._overlaps:
            return
        loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (its memory, its values)
        for _, _, _, others in self._overlaps:
            for key, tensor in others:
                if key not in loaded:
                    loaded[key] = (tensor, tensor.detach().clone())
        with torch.no_grad():
            for fqn, local, scratch, _ in self._overlaps:
                local.copy_(scratch)
                loaded[fqn] = (local, scratch)
        for fqn, _, _, others in self._overlaps:
            for key in [fqn] + [key for key, _ in others]:
                memory, values = loaded[key]
                if not _same_bytes(memory, values):
                    raise StateDictMismatchError(
                        f"{fqn!r} and {', '.join(repr(k) for k, _ in others)} are overlapping views of one "
                        "tensor in the state dict, but the checkpoint holds values for them that disagree; "
                        "give each key its own tensor, or leave one of them out of the state dict",
                        mismatched=[fqn],
                    )
