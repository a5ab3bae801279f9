"""Compressing and decompressing one stored item (the codecs of
:mod:`torchstow.format.compression`).

Floating-point (and complex) tensors are split into byte planes with torch
copies (one strided copy per plane, no per-element Python), then each plane is
compressed on its own: the planes of sign and exponent bits shrink a lot, the low
mantissa bytes hardly at all, so a plane whose first 64 KiB do not shrink by
3% is stored as it is without compressing the rest (most of the time such a
plane would cost, not save). The planes are grouped straight into the buffer
that is stored, laid out from its end, so a plane stored as it is is never
copied again. Zstandard runs at level 1 (for byte planes with a small hash table
and 7-byte matches: faster, and smaller, on the few values of exponent bytes)
and releases the GIL, so the writer's and reader's threads compress and
decompress in parallel.
"""

from __future__ import annotations

import struct
import threading

import torch
import zstandard

from torchstow.core.layout.views import tensor_bytes
from torchstow.errors import CorruptCheckpointError
from torchstow.format.compression import BYTEPLANES, ZSTD

__all__ = ["compress", "decompress_bytes", "decompress_into", "planes_codec"]

_LEVEL = 1
_SAMPLE = 64 << 10
_KEEP = 0.97  # a plane (or item) whose sample shrinks to more than this is stored as it is
_local = threading.local()


_PLANE_PARAMETERS = {"min_match": 7, "hash_log": 8}


def _compressor(planes: bool) -> zstandard.ZstdCompressor:
    """This thread's compressor: of byte planes, or of any bytes."""
    name = "planes" if planes else "bytes"
    found = getattr(_local, name, None)
    if found is None:
        if planes:
            params = zstandard.ZstdCompressionParameters.from_level(_LEVEL, **_PLANE_PARAMETERS)
            found = zstandard.ZstdCompressor(compression_params=params)
        else:
            found = zstandard.ZstdCompressor(level=_LEVEL)
        setattr(_local, name, found)
    return found


def planes_codec(dtype: torch.dtype | None) -> bool:
    """Whether a tensor of ``dtype`` is stored in byte planes (floating point and
    complex dtypes of several bytes per element)."""
    return dtype is not None and (dtype.is_floating_point or dtype.is_complex) and dtype.itemsize > 1


def _squeeze(data: memoryview, planes: bool = False) -> bytes | None:
    """``data`` as one zstd frame if that is shorter (and its sample shrinks enough), else None."""
    size = len(data)
    compressor = _compressor(planes)
    if size > _SAMPLE and len(compressor.compress(data[:_SAMPLE])) > _KEEP * _SAMPLE:
        return None
    frame = compressor.compress(data)
    return frame if len(frame) < size else None


def compress(data: memoryview, dtype: torch.dtype | None) -> tuple[bytes | torch.Tensor, str] | None:
    """The stored bytes of an item whose raw bytes are ``data`` (of a tensor of ``dtype``;
    None for an object's bytes: ``bytes``; else a contiguous uint8 tensor) and their codec,
    or None when compressing does not shrink it."""
    size = len(data)
    if not size:
        return None
    if not planes_codec(dtype):
        frame = _squeeze(data)
        return None if frame is None else (frame, ZSTD)
    assert dtype is not None
    k = dtype.itemsize
    n = size // k
    head = 8 * k
    elements = torch.frombuffer(data, dtype=torch.uint8).view(n, k)
    # The buffer stored: each plane grouped at its place as if all were stored raw,
    # after room for the header; the stored bytes are then laid out from the end.
    buffer = torch.empty(head + size, dtype=torch.uint8)
    out = tensor_bytes(buffer).cast("B")
    planes = buffer[head:].view(k, n)
    for j in range(k):  # plane j: byte k-1-j of each element, sign and exponent first
        planes[j].copy_(elements[:, k - 1 - j])
    lengths = [0] * k
    end = head + size  # where the stored bytes of the planes after this one begin
    for j in range(k - 1, -1, -1):
        at = head + j * n  # where plane j was grouped; end >= at + n
        frame = _squeeze(tensor_bytes(planes[j]), planes=True)
        if frame is None:
            lengths[j] = n
            if end > at + n:  # a later plane shrank: move this one up to it
                buffer[end - n : end].copy_(planes[j].clone())
        else:
            lengths[j] = len(frame)
            out[end - len(frame) : end] = frame
        end -= lengths[j]
    if end <= 2 * head:  # the planes shrank by less than the header takes: store it raw
        return None
    start = end - head
    struct.pack_into(f"<{k}Q", out, start, *lengths)
    return buffer[start:], BYTEPLANES


def _unzstd_into(frame: memoryview, out: memoryview) -> None:
    """Decompress one zstd ``frame`` into exactly ``out``; CorruptCheckpointError otherwise."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=True)
        got = 0
        while got < len(out):
            n = reader.readinto(out[got:])
            if not n:
                break
            got += n
        if got < len(out):
            raise CorruptCheckpointError(f"decompresses to {got} bytes, not the {len(out)} expected")
        if reader.read(1):
            raise CorruptCheckpointError(f"decompresses to more than the {len(out)} bytes expected")
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"does not decompress ({exc})") from exc


def decompress_into(stored: memoryview, codec: str, dtype: torch.dtype, out: torch.Tensor) -> None:
    """Decode the stored bytes of a tensor chunk into ``out``, a contiguous tensor of the
    chunk's raw bytes (any dtype). Raises CorruptCheckpointError (without naming the item:
    the caller adds where) when they do not decode to exactly its size."""
    size = out.nbytes
    if codec == ZSTD:
        _unzstd_into(stored, tensor_bytes(out))
        return
    if codec != BYTEPLANES:
        raise CorruptCheckpointError(f"codec {codec!r} is not one this torchstow decodes")
    k = dtype.itemsize
    n = size // k
    head = 8 * k
    if len(stored) < head:
        raise CorruptCheckpointError(f"holds {len(stored)} bytes, less than its {k} plane lengths")
    lengths = struct.unpack_from(f"<{k}Q", stored)
    if head + sum(lengths) != len(stored) or any(length > n for length in lengths):
        raise CorruptCheckpointError(
            f"its plane lengths {list(lengths)} do not fit its {len(stored)} bytes and {n} elements"
        )
    elements = out.view(torch.uint8).view(n, k) if size else out
    scratch: torch.Tensor | None = None
    pos = head
    for j, length in enumerate(lengths):
        piece = stored[pos : pos + length]
        pos += length
        if length == n:
            plane = torch.frombuffer(piece, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        else:
            if scratch is None:
                scratch = torch.empty(n, dtype=torch.uint8)
            _unzstd_into(piece, tensor_bytes(scratch))
            plane = scratch
        elements[:, k - 1 - j].copy_(plane)


def decompress_bytes(stored: memoryview, codec: str) -> bytes:
    """Decode an object's stored bytes (whose raw length the manifest does not record);
    CorruptCheckpointError when they do not decode."""
    if codec != ZSTD:
        raise CorruptCheckpointError(f"codec {codec!r} does not apply to an object's bytes")
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(stored)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"does not decompress ({exc})") from exc
