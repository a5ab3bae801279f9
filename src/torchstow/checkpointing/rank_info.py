"""This process's place in the job, as the checkpointers and barriers see it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RankInfo", "default_rank_info"]


@dataclass
class RankInfo:
    """This process's place in the job."""

    global_rank: int = 0
    global_world_size: int = 1


def default_rank_info() -> RankInfo:
    """The rank and world size of the default process group, or a single rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return RankInfo()
