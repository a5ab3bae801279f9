"""What the tests share about state dicts: the dtypes the round-trip tests cover (state dicts
compare with torchstow.testing.assert_same_state), and that a checkpoint stores each element once."""

from __future__ import annotations

import math

import torch

import torchstow
from torchstow.format.manifest import TensorStorageMetadata

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


def check_stored_once(path: str) -> None:
    """Every tensor element of the checkpoint at ``path`` is stored exactly once, whatever
    replicated it (its stored lengths add up to the tensor's size)."""
    metadata = torchstow.storage_reader(path).read_metadata()
    lengths: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        lengths[index.fqn] = lengths.get(index.fqn, 0) + info.length
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            assert lengths[fqn] == math.prod(entry.size) * entry.properties.dtype.itemsize, fqn
