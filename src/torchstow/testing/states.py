"""State dicts the conformance kits save: every dtype, nested containers, and their
zeroed twins to load into."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["every_dtype_state_dict", "zeros_like_state"]


def _dtypes() -> list[torch.dtype]:
    names = [
        "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "complex32",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    ]  # fmt: skip
    return [d for d in (getattr(torch, n, None) for n in names) if isinstance(d, torch.dtype)]


def _random(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bits of ``dtype`` (NaN payloads and all), valid 0/1 for bool."""
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    count = 1
    for n in shape:
        count *= n
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(tuple(shape))


def every_dtype_state_dict(seed: int = 0) -> dict[str, Any]:
    """A state dict with a tensor of every dtype, a scalar, an empty and a strided tensor,
    and one large enough to span several checksum blocks and upload parts."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {str(dtype).removeprefix("torch."): _random((3, 5), dtype, gen) for dtype in _dtypes()}
    return {
        "dtypes": tensors,
        "scalar": _random((), torch.float64, gen),
        "empty": torch.empty(0, 4, dtype=torch.float32),
        "strided": _random((6, 8), torch.int32, gen).t(),
        "large": _random((1536, 1024), torch.float32, gen),  # 6 MiB
    }


def zeros_like_state(sd: Any) -> Any:
    """A state dict of the same structure to load into: zero tensors, ``None`` for other leaves."""
    if isinstance(sd, torch.Tensor):
        return torch.zeros(sd.shape, dtype=sd.dtype)
    if isinstance(sd, Mapping):
        return {k: zeros_like_state(v) for k, v in sd.items()}
    if isinstance(sd, list | tuple):
        return type(sd)(zeros_like_state(v) for v in sd)
    return None
