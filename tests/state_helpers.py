"""Comparing nested state dicts bit for bit."""

from __future__ import annotations

from typing import Any

import torch

# Every dtype whose tensors are plain bytes (quantized and sub-byte dtypes are not).
ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.complex32,
    torch.complex64,
    torch.complex128,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, so NaN, -0.0 and every dtype compare bit for bit."""
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Assert two nested state dicts are identical: structure, types, dtypes, shapes and bits."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert torch.equal(bits(a), bits(b)), f"{path}: values differ"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
