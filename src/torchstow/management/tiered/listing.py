"""Each step of a tiered run and the tiers holding it, as ``torchstow ls ROOT --tiers`` shows.

The fast tier's URI comes from the caller or from the newest durable step's
user metadata (the manager records it there); ``{node}`` must be a whole
path segment so the nodes can be found by listing its parent. Only the fast
tiers this machine can open are seen (all of them for ``shm://`` and local
paths when the nodes are simulated on one host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchstow.management.catalog import list_steps
from torchstow.management.tiered.holdings import Held, complete_steps, inventory
from torchstow.management.tiered.manager import FAST_TIER_KEY, _store_backend
from torchstow.management.tiered.nodes import expand_node

__all__ = ["TierRow", "tier_listing"]


@dataclass(frozen=True)
class TierRow:
    """One step: the tiers holding it complete, the nodes whose fast tier holds its manifest,
    and its durable checkpoint (or None)."""

    step: int
    tiers: tuple[str, ...]
    fast_nodes: tuple[int, ...]
    durable_uri: str | None


def fast_tiers(fast: str, options: dict[str, Any] | None = None) -> dict[int, str]:
    """The fast tiers of template ``fast`` that exist, by node index."""
    if "{node}" not in fast:
        return {0: fast.rstrip("/")}
    head, _, tail = fast.partition("{node}")
    if not head.endswith("/") or (tail and not tail.startswith("/")):
        raise ValueError(f"{fast!r}: '{{node}}' must be a whole path segment to find the nodes' fast tiers")
    parent = head.rstrip("/")
    backend = _store_backend(parent, options, "fast")
    nodes = {}
    for child in backend.list_children(parent):
        name = child.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit():
            nodes[int(name)] = expand_node(fast, int(name)).rstrip("/")
    return dict(sorted(nodes.items()))


def tier_listing(
    root: str,
    fast: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    fast_storage_options: dict[str, Any] | None = None,
) -> tuple[str | None, list[TierRow]]:
    """The fast tier's template (given, or recorded in the newest durable step) and a row per
    step complete in some tier, ascending."""
    durable = {
        info.step: info
        for info in list_steps(root, storage_options=storage_options)  # not a user's best
        if info.step is not None
    }
    if fast is None:
        for step in sorted(durable, reverse=True):
            recorded = (durable[step].user_metadata or {}).get(FAST_TIER_KEY)
            if isinstance(recorded, str):
                fast = recorded
                break
    holdings: dict[int, dict[int, Held]] = {}
    if fast is not None:
        for node, uri in fast_tiers(fast, fast_storage_options).items():
            holdings[node] = inventory(_store_backend(uri, fast_storage_options, "fast"), uri)
    complete = {choice.step for choice in complete_steps(holdings)}
    rows = []
    for step in sorted(complete | set(durable)):
        tiers = tuple(t for t, held in (("fast", complete), ("durable", durable)) if step in held)
        nodes = tuple(n for n, inv in holdings.items() if step in inv and inv[step].manifest is not None)
        rows.append(TierRow(step, tiers, nodes, durable[step].uri if step in durable else None))
    return fast, rows
