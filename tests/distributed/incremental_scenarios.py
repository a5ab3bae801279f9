"""Scenarios for incremental saves over several ranks (see dist_pool.py)."""

from __future__ import annotations

from typing import Any

import torch
from dist_scenarios import mesh_for, values
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import torchstow


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so comparisons are bit for bit."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


SHAPES = {"frozen0": (64, 256), "frozen1": (64, 256), "trainable": (16, 32)}


def expected(step: int) -> dict[str, torch.Tensor]:
    """The full tensors at ``step``: only ``trainable`` changes."""
    return {name: values(name, shape, step if name == "trainable" else 0) for name, shape in SHAPES.items()}


def _dtensors(world_size: int, full: dict[str, torch.Tensor], dim: int) -> dict[str, Any]:
    mesh = mesh_for(world_size, ("S0",))
    out: dict[str, Any] = {
        name: distribute_tensor(t, mesh, [Shard(dim)], src_data_rank=None) for name, t in full.items()
    }
    out["norm"] = distribute_tensor(torch.arange(8.0), mesh, [Replicate()], src_data_rank=None)
    return out


def _save(state: dict[str, Any], path: str, asynchronous: bool, **options: Any) -> None:
    """Save ``state`` to ``path`` with ``options``: through async_save (waited for), or save."""
    if asynchronous:
        torchstow.async_save(state, path, **options).result()
    else:
        torchstow.save(state, path, timeout=60, **options)


def save_two_steps(
    rank: int, world_size: int, root: str, asynchronous: bool, compression: str | None = None
) -> list[int]:
    """A plain save of step 1, then an incremental save of step 2 on it, both with
    ``compression``; bytes each wrote."""
    written = []
    for step in (1, 2):
        state = _dtensors(world_size, expected(step), 0)
        base = None if step == 1 else f"{root}/step-1"
        path = f"{root}/step-{step}"
        _save(state, path, asynchronous, base=base, compression=compression)
        written.append(torchstow.info(path).nbytes_written)
    return written


def load_resharded(rank: int, world_size: int, path: str, step: int) -> bool:
    """Load ``path`` as Shard(1) over this world; whether every shard is bit-exact."""
    full = expected(step)
    target = _dtensors(world_size, {n: torch.zeros_like(t) for n, t in full.items()}, 1)
    torchstow.load(target, path, timeout=60)
    want = _dtensors(world_size, full, 1)
    return all(torch.equal(raw(target[n].to_local()), raw(want[n].to_local())) for n in full) and torch.equal(
        target["norm"].to_local(), torch.arange(8.0)
    )


def save_trusting(rank: int, world_size: int, root: str, asynchronous: bool) -> tuple[int, int]:
    """Steps 1-3 with trust_version_counter=True, ``trainable`` changed in place before
    step 3: (bytes this rank hashed in step 3, bytes step 3 wrote over all ranks)."""
    from torchstow.core.layout import incremental

    state = _dtensors(world_size, expected(1), 0)
    hashed: list[int] = []
    real = incremental.content_hash

    def counting(view: memoryview) -> str:
        hashed.append(len(view))
        return real(view)

    incremental.content_hash = counting
    try:
        for step in (1, 2, 3):
            if step == 3:
                hashed.clear()
                with torch.no_grad():
                    state["trainable"].add_(1)
            base = None if step == 1 else f"{root}/step-{step - 1}"
            path = f"{root}/step-{step}"
            _save(state, path, asynchronous, base=base, trust_version_counter=True)
    finally:
        incremental.content_hash = real
    return sum(hashed), torchstow.info(f"{root}/step-3").nbytes_written
