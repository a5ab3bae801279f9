"""Node identity and the placement of replicas.

A node is the set of ranks on one host: torchrun's node rank (``GROUP_RANK``),
else ``TORCHSTOW_NODE``, else 0. Each node's part of a step is copied to the
fast tiers of the next ``replicas`` nodes (in node order, wrapping around).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["NODE_ENV", "Topology", "expand_node", "node_index"]

NODE_ENV = "TORCHSTOW_NODE"


def node_index() -> int:
    """This host's node index: ``GROUP_RANK`` (torchrun), else ``TORCHSTOW_NODE``, else 0."""
    for name in ("GROUP_RANK", NODE_ENV):
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                node = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a node index (a non-negative integer)") from None
            if node < 0:
                raise ValueError(f"{name}={value!r} is not a node index (a non-negative integer)")
            return node
    return 0


def expand_node(uri: str, node: int) -> str:
    """``uri`` with ``{node}`` replaced by ``node``."""
    return uri.replace("{node}", str(node))


@dataclass(frozen=True)
class Topology:
    """Which node each rank of the manager's group is on (``nodes[group_rank]``)."""

    rank: int
    nodes: tuple[int, ...]

    @property
    def node(self) -> int:
        return self.nodes[self.rank]

    @property
    def order(self) -> list[int]:
        """The node indices present, ascending."""
        return sorted(set(self.nodes))

    def ranks_of(self, node: int) -> list[int]:
        """The group ranks on ``node``, ascending."""
        return [r for r, n in enumerate(self.nodes) if n == node]

    @property
    def local_ranks(self) -> list[int]:
        return self.ranks_of(self.node)

    @property
    def is_leader(self) -> bool:
        """Whether this rank speaks for its node (its lowest rank)."""
        return self.local_ranks[0] == self.rank

    def replica_pairs(self, replicas: int) -> list[tuple[int, int]]:
        """``(sender, receiver)`` group ranks: rank ``i`` of a node sends its files to rank
        ``i mod size`` of each of the next ``replicas`` nodes (fewer when there are fewer nodes)."""
        order = self.order
        pairs = []
        for p, node in enumerate(order):
            senders = self.ranks_of(node)
            for k in range(1, min(replicas, len(order) - 1) + 1):
                receivers = self.ranks_of(order[(p + k) % len(order)])
                pairs += [(s, receivers[i % len(receivers)]) for i, s in enumerate(senders)]
        return pairs
