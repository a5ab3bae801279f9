"""Private gloo groups for torchstow's own traffic between ranks.

Async commits and replica exchanges run on groups of their own, so they never
interleave with the training loop's collectives on its groups (or share an
accelerator stream with them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from torchstow.errors import CheckpointTimeoutError

__all__ = ["private_gloo_group"]


def private_gloo_group(
    ranks: Sequence[int], timeout: timedelta | None = None, *, step: str, what: str
) -> Any:
    """A new gloo group of ``ranks`` (global ranks); every one of them calls this.

    For the whole world every rank calls it anyway and the group gets a fresh
    sequential name; for a subgroup only its members synchronize. Groups are
    never destroyed by torchstow: torch names a locally synchronized group
    after its ranks and the number of live groups, so destroying one would
    let the next such group reuse its name and meet stale rendezvous keys.

    A rank that does not join within ``timeout`` (dead, stalled, or not at
    the same call) makes the ranks waiting for it raise
    :class:`~torchstow.errors.CheckpointTimeoutError` (protocol step ``step``;
    ``what`` names the caller that makes the group, as "the commit group of
    its first async_save"), not torch's store or connection error.
    """
    import torch.distributed as dist

    members = sorted(ranks)
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    try:
        return dist.new_group(
            members,
            backend="gloo",
            use_local_synchronization=len(members) != dist.get_world_size(),
            **options,
        )
    except RuntimeError as exc:  # torch's DistStoreError or a gloo connection error
        rank = dist.get_rank()
        limit = f"{timeout.total_seconds():g}s" if timeout is not None else "torch's default timeout"
        raise CheckpointTimeoutError(
            f"checkpoint {step}: rank {rank} lost contact with its group of {len(members)} ranks "
            f"while making {what}: another rank died, stalled, or did not make it within {limit}. "
            f"Transport error: {exc}",
            rank=rank,
            step=step,
        ) from exc
