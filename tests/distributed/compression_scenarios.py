"""Scenarios of the compressed-checkpoint tests (see dist_pool.py): DTensors of several dtypes
saved with ``compression="zstd"`` by one world size and placement, loaded by another."""

from __future__ import annotations

from typing import Any

import torch
from dist_scenarios import full_values, mesh_for, mismatches, placements
from torch.distributed.tensor import distribute_tensor

import torchstow

# Each rank's chunk of a float tensor is over 4 KiB, so it is stored in byte planes.
SHAPES = {"w32": (48, 48), "wbf16": (40, 112), "w16": (36, 120), "ints": (64, 8)}
DTYPES = {"w32": torch.float32, "wbf16": torch.bfloat16, "w16": torch.float16, "ints": torch.int64}


def full(name: str, seed: int) -> torch.Tensor:
    """The full value of tensor ``name`` (small normals, whose exponent bytes compress; small ints)."""
    gen = torch.Generator().manual_seed(seed * 100 + sum(map(ord, name)))
    if name == "ints":
        return torch.randint(0, 9, SHAPES[name], generator=gen)
    return (torch.randn(SHAPES[name], generator=gen) * 0.01).to(DTYPES[name])


def _state(world_size: int, layout: tuple[str, ...], seed: int | None) -> dict[str, Any]:
    mesh = mesh_for(world_size, layout)
    out: dict[str, Any] = {"step": seed}
    for name, shape in SHAPES.items():
        value = torch.zeros(shape, dtype=DTYPES[name]) if seed is None else full(name, seed)
        out[name] = distribute_tensor(value, mesh, placements(layout, len(shape)), src_data_rank=None)
    return out


def save_compressed(rank: int, world_size: int, uri: str, layout: tuple[str, ...], seed: int) -> None:
    torchstow.save(_state(world_size, layout, seed), uri, compression="zstd", timeout=60)


def load_compressed(
    rank: int, world_size: int, uri: str, layout: tuple[str, ...], seed: int
) -> dict[str, Any]:
    """Load into zeros of another layout; where the values differ from the saved ones."""
    state = _state(world_size, layout, None)
    torchstow.load(state, uri, timeout=60)
    expected = {name: full(name, seed) for name in SHAPES}
    expected["step"] = seed
    return {"mismatches": mismatches(expected, full_values(state))}
