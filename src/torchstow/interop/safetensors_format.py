"""Writing safetensors as Hugging Face does, one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
(each tensor's dtype, shape and byte range; string metadata under
``__metadata__``) padded with spaces to 8 bytes, then the raw bytes. The
header is known before any tensor is read, so :func:`write_shard` streams
the tensors in one by one. A checkpoint is sharded into
``model-0000i-of-0000n.safetensors`` of at most ``max_shard_bytes`` each
(a larger tensor gets a shard of its own), with ``model.safetensors.index.json``
mapping each key to its shard, as ``transformers`` writes and reads them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from torchstow.core.layout.views import tensor_bytes
from torchstow.errors import FormatVersionError

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX",
    "METADATA_KEY",
    "SINGLE",
    "Shard",
    "index_document",
    "plan_shards",
    "safetensors_dtype",
    "torch_dtype",
    "write_shard",
]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
METADATA_KEY = "__metadata__"  # the header's string metadata, never a tensor's name
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"

_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def safetensors_dtype(dtype: torch.dtype) -> str | None:
    """The safetensors code of ``dtype`` (``"BF16"``), or None when safetensors has none."""
    return _CODES.get(dtype)


def torch_dtype(code: str, *, key: str = "", file: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype code; FormatVersionError naming the
    tensor ``key`` and its ``file`` for a code this torchstow does not read."""
    try:
        return _DTYPES[code]
    except KeyError:
        raise FormatVersionError(
            f"{file}: tensor {key!r} has safetensors dtype {code!r}, which torchstow does not read "
            f"(it reads {', '.join(sorted(_DTYPES))})"
        ) from None


@dataclass
class Shard:
    """One output file: its name and the keys it holds, in order."""

    name: str
    keys: list[str] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[Shard]:
    """Split ``(key, nbytes)`` in order into shards of at most ``max_shard_bytes``, as
    ``huggingface_hub`` splits a state dict: a tensor larger than that gets a shard of its
    own, and the shard being filled goes on after it. Named as Hugging Face names them."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[Shard] = []
    current = Shard("")
    for key, nbytes in sizes:
        if nbytes > max_shard_bytes:  # a shard of its own; the current one goes on filling
            shards.append(Shard("", [key], nbytes))
            continue
        if current.keys and current.nbytes + nbytes > max_shard_bytes:
            shards.append(current)
            current = Shard("")
        current.keys.append(key)
        current.nbytes += nbytes
    if current.keys or not shards:
        shards.append(current)
    for i, shard in enumerate(shards):
        shard.name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    doc: dict[str, Any] = {METADATA_KEY: metadata}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        doc[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(
    out: BinaryIO,
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Write one safetensors file: the header of ``entries`` (key, dtype, shape), then
    each tensor's bytes as ``fetch(key)`` returns them (already of that dtype and shape)."""
    out.write(_header(entries, metadata))
    for key, dtype, shape in entries:
        tensor = fetch(key)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{key}: the source gave {tensor.dtype} {list(tensor.shape)}, its metadata said "
                f"{dtype} {list(shape)}"
            )
        if not (tensor.is_cpu and tensor.is_contiguous()):
            tensor = tensor.cpu().contiguous()
        if tensor.numel():
            out.write(tensor_bytes(tensor))
        del tensor


def index_document(shards: list[Shard], total_size: int) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` of ``shards``."""
    return {
        "metadata": {"total_size": total_size},
        "weight_map": {key: shard.name for shard in shards for key in shard.keys},
    }
