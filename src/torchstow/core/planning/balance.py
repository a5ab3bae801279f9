"""Owner assignment: which of the ranks holding a replicated item writes it.

The one balancing rule both save planners use (the general item-by-item one
and the column-wise one for aligned plans), so they agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchstow.core.planning.items import TensorWriteData

__all__ = ["assign_owners", "item_bytes"]


def item_bytes(td: TensorWriteData | None) -> int:
    """Bytes of a write item's chunk (0 for an object)."""
    return 0 if td is None else td.chunk.sizes.numel() * td.properties.dtype.itemsize


def assign_owners(
    load: list[int],
    count: list[int],
    shared: Sequence[tuple[int, Sequence[int]]],
    nodes: Sequence[int] | None = None,
) -> list[int]:
    """The rank that writes (or reads) each shared item: the holder with the fewest bytes so far,
    then the fewest items, then the lowest rank; the biggest items are placed first.

    ``load`` and ``count`` are each rank's bytes and items already charged (its own items) and
    are updated in place. ``shared`` lists ``(bytes, holders)`` for each item several ranks hold,
    ``holders`` in rank order, the items in the order they first appear, rank by rank: among
    items of equal size that order decides. With ``nodes`` (each rank's node number), the
    holder on the node with the fewest bytes so far comes first, so that nodes share the work
    too. Returns the owners in ``shared``'s order.
    """
    order = sorted(range(len(shared)), key=lambda i: -shared[i][0])  # stable: first appearance among equals
    node_of = list(nodes) if nodes is not None else [0] * len(load)
    node_load = [0] * (max(node_of, default=-1) + 1)
    for rank, size in enumerate(load):
        node_load[node_of[rank]] += size
    keys = list(zip(load, count, strict=True))  # cached: the save planners' hot loop
    key = keys.__getitem__ if nodes is None else lambda r: (node_load[node_of[r]], *keys[r])
    owners = [0] * len(shared)
    for i in order:
        size, holders = shared[i]
        best = min(holders, key=key)
        owners[i] = best
        load[best] += size
        count[best] += 1
        keys[best] = (load[best], count[best])
        node_load[node_of[best]] += size
    return owners
