"""Scenarios for the plan cache, run on every rank of a worker group (see dist_pool.py).

Each save is watched through :class:`ProcessGroupCollective`: which
collectives it ran in which protocol step, and how many bytes this rank sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from dist_scenarios import mesh_for
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import torchstow
import torchstow.planning
from torchstow.core.protocol.collective import ProcessGroupCollective
from torchstow.core.protocol.plan_cache import clear_plan_cache


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so comparisons are bit for bit."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


Calls = list[tuple[str, str, int]]  # (collective, protocol step, bytes this rank sent)


@contextmanager
def _watching(calls: Calls) -> Iterator[None]:
    """Record every collective ProcessGroupCollective runs, with its step and bytes sent."""
    names = ("gather", "scatter", "broadcast", "all_gather_records")
    originals = {name: getattr(ProcessGroupCollective, name) for name in names}

    def sent(name: str, self: Any, payload: Any) -> int:
        if name == "scatter":
            return sum(map(len, payload)) if payload is not None else 0
        if name == "broadcast":
            return len(payload) if self.is_coordinator and payload is not None else 0
        return len(payload)

    def watched(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, payload: Any, step: str = "") -> Any:
            calls.append((name, step, sent(name, self, payload)))
            return fn(self, payload, step)

        return wrapper

    for name, fn in originals.items():
        setattr(ProcessGroupCollective, name, watched(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ProcessGroupCollective, name, fn)


def _state(rank: int, world_size: int, step: int, wide: bool) -> dict[str, Any]:
    """A state dict of DTensors (sharded and replicated), a tensor of this rank
    alone, and JSON leaves; values change with ``step``, structure with ``wide``."""
    mesh = mesh_for(world_size, ("S0",))
    gen = torch.Generator().manual_seed(step * 100 + rank)
    full = torch.Generator().manual_seed(step)
    return {
        "model": {
            f"layer{i}": distribute_tensor(
                torch.randn(8, 6, generator=full), mesh, [Shard(0)], src_data_rank=None
            )
            for i in range(3)
        },
        "norm": distribute_tensor(torch.randn(5, generator=full), mesh, [Replicate()], src_data_rank=None),
        f"rank{rank}": torch.randn(4, 5 if wide else 4, generator=gen),
        "step": step,
        "note": f"saved at step {step}",
        "who": f"rank {rank} at step {step}",  # differs between ranks: the manifest holds one
    }


def _loads_back(rank: int, world_size: int, path: str, state: dict[str, Any]) -> bool:
    """Whether a load into fresh targets gives ``state`` back bit for bit."""
    target = _state(rank, world_size, 999, state[f"rank{rank}"].shape[1] == 5)
    torchstow.load(target, path, timeout=60, strict=False)  # other ranks' private tensors are not ours
    for key in ("layer0", "layer1", "layer2"):
        if not torch.equal(raw(target["model"][key].to_local()), raw(state["model"][key].to_local())):
            return False
    return (
        torch.equal(raw(target["norm"].to_local()), raw(state["norm"].to_local()))
        and torch.equal(raw(target[f"rank{rank}"]), raw(state[f"rank{rank}"]))
        and target["step"] == state["step"]
        and target["note"] == state["note"]
    )


def save_series(
    rank: int, world_size: int, root: str, widen_on: int, widen_at: int, caching: bool = True
) -> list[dict[str, Any]]:
    """Saves 1..5 of one structure; from save ``widen_at`` on, rank ``widen_on`` alone
    saves a wider private tensor. Per save: the collectives, bytes, and a bit-exact reload."""
    clear_plan_cache()
    out = []
    for step in range(1, 6):
        state = _state(rank, world_size, step, wide=rank == widen_on and step >= widen_at)
        path = f"{root}/step-{step}"
        calls: Calls = []
        planner = torchstow.planning.DefaultSavePlanner(enable_plan_caching=caching)
        with _watching(calls):
            metadata = torchstow.save(state, path, planner=planner, timeout=60)
        entries = metadata.state_dict_metadata
        out.append(
            {
                "calls": calls,
                "loads_back": _loads_back(rank, world_size, path, state),
                "manifest_step": entries["step"].value,
                "manifest_note": entries["note"].value,
                "manifest_who": entries["who"].value,
                "entries": {k: v for k, v in entries.items() if k not in ("step", "note", "who")},
            }
        )
    return out


def failing_after_cached(rank: int, world_size: int, root: str) -> list[str]:
    """Two good saves (the second one a cache hit), then a save that fails in
    local planning on the last rank only, then a good save again."""
    clear_plan_cache()
    outcomes = []
    for step in range(1, 5):
        state = _state(rank, world_size, step, wide=False)
        if step == 3 and rank == world_size - 1:
            state[f"rank{rank}"] = torch.empty(4, 4, device="meta")  # fails local planning here
        try:
            torchstow.save(state, f"{root}/step-{step}", timeout=60)
            outcomes.append(
                "ok" if _loads_back(rank, world_size, f"{root}/step-{step}", state) else "differs"
            )
        except torchstow.CheckpointException as exc:
            outcomes.append(f"failed on {sorted(exc.failures)}")
    return outcomes
