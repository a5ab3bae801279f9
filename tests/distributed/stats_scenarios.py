"""Scenarios (run on every rank of a gloo group) for the stats of distributed saves."""

from __future__ import annotations

from typing import Any

import torch

import torchstow
from torchstow.core.protocol.plan_cache import clear_plan_cache


def _state(rank: int) -> dict[str, Any]:
    """A tensor of this rank alone, of ``(rank + 1) * 100`` float32 values, and a step."""
    return {f"rank{rank}": torch.ones((rank + 1) * 100), "step": 7}


def stats_of_saves(rank: int, world_size: int, root: str) -> list[dict[str, Any]]:
    """Two sync saves (the second reuses the first one's global plan) and an async save:
    what each rank's stats said, and the manifest's ``save_seconds`` as every rank got it."""
    clear_plan_cache()
    saves = []
    for step in (1, 2):
        stats = torchstow.SaveStats()
        saves.append((stats, torchstow.save(_state(rank), f"{root}/step-{step}", timeout=60, stats=stats)))
    saving = torchstow.async_save(_state(rank), f"{root}/step-3", timeout=60)
    committed = saving.result(timeout=60)
    saves.append((saving.stats, committed))
    return [
        {
            "seconds": dict(s.seconds),
            "bytes_staged": s.bytes_staged,
            "bytes_written": s.bytes_written,
            "save_seconds": m.save_seconds,
        }
        for s, m in saves
    ]
