"""Private gloo groups for torchstow's own traffic between ranks.

Async commits and replica exchanges run on groups of their own, so they never
interleave with the training loop's collectives on its groups (or share an
accelerator stream with them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

__all__ = ["private_gloo_group"]


def private_gloo_group(ranks: Sequence[int], timeout: timedelta | None = None) -> Any:
    """A new gloo group of ``ranks`` (global ranks); every one of them calls this.

    For the whole world every rank calls it anyway and the group gets a fresh
    sequential name; for a subgroup only its members synchronize. Groups are
    never destroyed by torchstow: torch names a locally synchronized group
    after its ranks and the number of live groups, so destroying one would
    let the next such group reuse its name and meet stale rendezvous keys.
    """
    import torch.distributed as dist

    members = sorted(ranks)
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    return dist.new_group(
        members,
        backend="gloo",
        use_local_synchronization=len(members) != dist.get_world_size(),
        **options,
    )
