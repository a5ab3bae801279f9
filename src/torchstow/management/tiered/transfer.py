"""Whole data files sent between ranks over a process group (gloo point-to-point).

Every rank computes the same schedule of :class:`Transfer` records; each one
posts a receive for every file addressed to it and a send for every file it
serves, then waits for all of them. A rank never opens another node's store:
the holder reads the file from its own store and sends the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

__all__ = ["Transfer", "run_transfers"]


@dataclass(frozen=True)
class Transfer:
    """File ``name`` (``size`` bytes) goes from group rank ``src`` to group rank ``dst``."""

    src: int
    dst: int
    name: str
    size: int


def run_transfers(
    group: Any,
    rank: int,
    schedule: Sequence[Transfer],
    read: Callable[[str, torch.Tensor], None],
    timeout: float,
) -> dict[str, torch.Tensor]:
    """Carry out this rank's part of ``schedule``: the files it received, by name.

    ``read(name, buffer)`` fills ``buffer`` with file ``name`` of this rank's
    store. Raises (on this rank) when a peer does not take part within
    ``timeout`` seconds.
    """
    import torch.distributed as dist

    received: dict[str, torch.Tensor] = {}
    works = []
    for tag, t in enumerate(schedule):
        if t.dst == rank and t.src != rank:
            buffer = received[t.name] = torch.empty(t.size, dtype=torch.uint8)
            works.append((dist.irecv(buffer, group=group, group_src=t.src, tag=tag), t))
    outgoing = []
    for tag, t in enumerate(schedule):
        if t.src == rank and t.dst != rank:
            data = torch.empty(t.size, dtype=torch.uint8)
            read(t.name, data)
            outgoing.append(data)  # kept alive until the send completes
            works.append((dist.isend(data, group=group, group_dst=t.dst, tag=tag), t))
    for work, t in works:
        try:
            assert work is not None  # point-to-point ops always return their work
            work.wait(timedelta(seconds=timeout))
        except RuntimeError as exc:
            peer = t.src if t.dst == rank else t.dst
            raise RuntimeError(
                f"group rank {rank}: sending {t.name} ({t.src} -> {t.dst}) failed: is group rank {peer} "
                f"alive? {exc}"
            ) from exc
    return received
