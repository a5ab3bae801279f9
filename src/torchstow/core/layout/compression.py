"""Compressing and decompressing one stored item (the codecs of
:mod:`torchstow.format.compression`).

Floating-point (and complex) tensors are split into byte planes, then each plane
is compressed on its own: the planes of sign and exponent bits shrink a lot, the
low mantissa bytes hardly at all, so a plane whose first 16 KiB do not shrink by
3% is stored as it is without compressing the rest (most of the time such a
plane would cost, not save). The planes are grouped straight into the buffer
that is stored, laid out from its end, so a plane stored as it is is never
copied again.

Splitting the planes is a vectorized torch copy, not a byte loop: byte ``b`` of
every element is the low byte of the ``k``-byte integers read ``b`` bytes further
on, so one narrowing copy of that (unaligned) integer view takes it out. Joining
them is a transpose of a piece of the planes at a time, gathered in a scratch
that stays in cache (see decompress_into and _pixel). Zstandard
runs at level 1 (for byte planes with a 64-entry hash table, 7-byte matches and
a 128 KiB window: faster, and smaller, on the few values of exponent bytes) and
releases the GIL, so the writer's and reader's threads compress and decompress
in parallel.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from collections.abc import Callable

import torch
import zstandard

from torchstow.core.layout.views import tensor_bytes
from torchstow.errors import CorruptCheckpointError
from torchstow.format.compression import BYTEPLANES, ZSTD

try:  # zstandard's cffi binding of libzstd, for byte planes when it loads (see _LibzstdPlanes)
    from zstandard.backend_cffi import ffi as _ffi
    from zstandard.backend_cffi import lib as _lib
except ImportError:  # the cffi package is not installed: zstandard's own API does it all
    _ffi = _lib = None

__all__ = ["compress", "decompress_bytes", "decompress_into", "planes_codec"]

_LEVEL = 1
_SAMPLE = 16 << 10
# A byte plane is judged from fewer bytes: what decides is how often each byte value comes,
# which 4 KiB show as well as 16 (the same planes shrink on the demo state, 3% less CPU).
_PLANE_SAMPLE = 4 << 10
_KEEP = 0.97  # a plane (or item) whose sample shrinks to more than this is stored as it is
# A smaller tensor is one zstd frame: k planes (k frames, k lengths) cost more CPU than they
# save bytes on it (a bias or a norm's weight, an optimizer's step counter).
_PLANES_MIN = 4 << 10
# Byte planes are joined this many bytes of a chunk at a time: the piece's planes and their
# interleaved copy (twice this) stay in a core's L2 cache.
_PIECE = 512 << 10
_local = threading.local()

_PLANE_PARAMETERS = {"min_match": 7, "hash_log": 6, "window_log": 17}
_INTEGERS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # k-byte integers, to split planes

_Frame = Callable[[memoryview, int], "bytes | memoryview | None"]
"""Makes one zstd frame of some bytes if it is shorter than a limit, else None."""


class _LibzstdPlanes:
    """Byte planes compressed by libzstd through zstandard's cffi binding, which reaches a
    setting zstandard's own API does not: Huffman-coded literals together with the fast
    strategy's acceleration (by itself the acceleration stores literals raw). Exponent bytes
    are mostly literals of few values: this compresses them about 1.5x faster, into about 2%
    more bytes, and their frames decompress faster too. Target length 4096 (the acceleration
    skips far ahead after a miss) finds almost no match in them: 5% faster both ways than 64,
    for 0.3% more bytes of the plane. The frames are ordinary zstd frames; any zstd reads them."""

    def __init__(self) -> None:
        assert _ffi is not None and _lib is not None
        cctx = _ffi.gc(_lib.ZSTD_createCCtx(), _lib.ZSTD_freeCCtx)
        settings = {
            "ZSTD_c_compressionLevel": _LEVEL,
            "ZSTD_c_minMatch": _PLANE_PARAMETERS["min_match"],
            "ZSTD_c_hashLog": _PLANE_PARAMETERS["hash_log"],
            "ZSTD_c_windowLog": _PLANE_PARAMETERS["window_log"],
            "ZSTD_c_targetLength": 4096,
            "ZSTD_c_literalCompressionMode": _lib.ZSTD_ps_enable,
        }
        for name, value in settings.items():
            if _lib.ZSTD_isError(_lib.ZSTD_CCtx_setParameter(cctx, getattr(_lib, name), value)):
                raise ValueError(f"this libzstd refuses {name}")
        self._cctx = cctx
        self._alloc = _ffi.new_allocator(should_clear_after_alloc=False)

    def __call__(self, data: memoryview, limit: int) -> memoryview | None:
        assert _ffi is not None and _lib is not None
        room = self._alloc("char[]", limit - 1)  # a frame of limit bytes or more is an error here
        size = _lib.ZSTD_compress2(self._cctx, room, limit - 1, _ffi.from_buffer(data), len(data))
        return None if _lib.ZSTD_isError(size) else memoryview(_ffi.buffer(room, size))


def _zstandard_frames(compressor: zstandard.ZstdCompressor) -> _Frame:
    def frame(data: memoryview, limit: int) -> bytes | None:
        found = compressor.compress(data)
        return found if len(found) < limit else None

    return frame


def _compressor(planes: bool) -> _Frame:
    """This thread's compressor: of byte planes, or of any bytes."""
    name = "planes" if planes else "bytes"
    found: _Frame | None = getattr(_local, name, None)
    if found is None:
        if not planes:
            found = _zstandard_frames(zstandard.ZstdCompressor(level=_LEVEL))
        else:
            try:
                found = _LibzstdPlanes() if _lib is not None else None
            except (AttributeError, ValueError):  # a libzstd without the setting
                found = None
            if found is None:
                params = zstandard.ZstdCompressionParameters.from_level(_LEVEL, **_PLANE_PARAMETERS)
                found = _zstandard_frames(zstandard.ZstdCompressor(compression_params=params))
        setattr(_local, name, found)
    return found


def planes_codec(dtype: torch.dtype | None) -> bool:
    """Whether a tensor of ``dtype`` is stored in byte planes (floating point and
    complex dtypes of several bytes per element)."""
    return dtype is not None and (dtype.is_floating_point or dtype.is_complex) and dtype.itemsize > 1


def _squeeze(data: memoryview, planes: bool = False) -> bytes | memoryview | None:
    """``data`` as one zstd frame if that is shorter (and its sample shrinks enough), else None."""
    frame = _compressor(planes)
    sample = _PLANE_SAMPLE if planes else _SAMPLE
    if len(data) > sample and frame(data[:sample], int(_KEEP * sample) + 1) is None:
        return None
    return frame(data, len(data))


def _split(data: memoryview, elements: torch.Tensor, b: int, plane: torch.Tensor) -> None:
    """Copy byte ``b`` of each of the ``n`` elements (the rows of ``elements``, the
    bytes of ``data``) into ``plane``."""
    n, k = elements.shape
    integer = _INTEGERS.get(k)
    if integer is None or n < 2:
        plane.copy_(elements[:, b])
        return
    # The low byte of the k-byte integer that starts b bytes into element i is byte b of
    # element i (little-endian): a narrowing copy keeps it. The last such integer would
    # run past the end, so the last element's byte is copied apart.
    plane[:-1].copy_(torch.frombuffer(data, dtype=integer, count=n - 1, offset=b))
    plane[-1] = elements[-1, b]


def compress(data: memoryview, dtype: torch.dtype | None) -> tuple[bytes | torch.Tensor, str] | None:
    """The stored bytes of an item whose raw bytes are ``data`` (of a tensor of ``dtype``;
    None for an object's bytes: ``bytes``; else a contiguous uint8 tensor) and their codec,
    or None when compressing does not shrink it."""
    size = len(data)
    if not size:
        return None
    if not planes_codec(dtype) or size < _PLANES_MIN:
        frame = _squeeze(data)
        return None if frame is None else (bytes(frame), ZSTD)
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
        _split(data, elements, k - 1 - j, planes[j])
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


def _decompressor(i: int = 0) -> zstandard.ZstdDecompressor:
    """This thread's ``i``-th decompressor (a decompressor serves one stream at a time, and
    the planes of a chunk are decoded side by side, a piece of each in turn)."""
    found: list[zstandard.ZstdDecompressor] | None = getattr(_local, "decompressors", None)
    if found is None:
        found = _local.decompressors = []
    while len(found) <= i:
        found.append(zstandard.ZstdDecompressor())
    return found[i]


def _scratch(size: int) -> tuple[torch.Tensor, memoryview]:
    """This thread's scratch buffer of at least ``size`` bytes (kept for the next chunk), and a
    byte view of it."""
    found: tuple[torch.Tensor, memoryview] | None = getattr(_local, "scratch", None)
    if found is None or found[0].numel() < size:
        buffer = torch.empty(size, dtype=torch.uint8)
        found = _local.scratch = (buffer, tensor_bytes(buffer).cast("B"))
    return found


def _whole_frames(frames: memoryview) -> None:
    """CorruptCheckpointError unless ``frames`` is whole zstd frames back to back: a stream
    ends quietly on bytes too few to be a frame (the start of one), so they are found here,
    by walking the frames' block headers (when zstandard's cffi binding loads)."""
    if _lib is None:
        return
    with _ffi.from_buffer(frames) as start:  # let go before an error leaves (see _unzstd_into)
        at = 0
        while at < len(frames):
            size = _lib.ZSTD_findFrameCompressedSize(start + at, len(frames) - at)
            if _lib.ZSTD_isError(size):
                name = _ffi.string(_lib.ZSTD_getErrorName(size)).decode()
                raise CorruptCheckpointError(f"does not decompress (byte {at}: {name})")
            at += size


def _dctx() -> object:
    """This thread's libzstd decompression context (through zstandard's cffi binding)."""
    assert _ffi is not None and _lib is not None
    found = getattr(_local, "dctx", None)
    if found is None:
        found = _local.dctx = _ffi.gc(_lib.ZSTD_createDCtx(), _lib.ZSTD_freeDCtx)
    return found


def _unzstd_into(frame: memoryview, out: memoryview) -> None:
    """Decompress zstd ``frame`` (frames back to back) into exactly ``out``;
    CorruptCheckpointError otherwise.

    Through the cffi binding, one call of libzstd decodes it all straight into ``out``: it
    writes nothing past ``out``, and refuses bytes that are not whole frames (junk after the
    last frame, however short, included)."""
    if _lib is None:
        _whole_frames(frame)
        reader = _decompressor().stream_reader(frame, read_across_frames=True)
        _read_exactly(reader, out)
        _check_ended(reader, len(out))
        return
    # The buffers are handed over as temporaries, let go when the call returns: one held by a
    # local would stay exported from the traceback of the error raised below, and the garbage
    # collector, clearing its memoryview first, then frees that memoryview's buffer twice.
    size = _lib.ZSTD_decompressDCtx(
        _dctx(),
        _ffi.from_buffer(out, require_writable=True) if len(out) else _ffi.NULL,  # b"" is read-only
        len(out),
        _ffi.from_buffer(frame),
        len(frame),
    )
    if _lib.ZSTD_isError(size):
        name = _ffi.string(_lib.ZSTD_getErrorName(size)).decode()
        raise CorruptCheckpointError(f"does not decompress into its {len(out)} bytes ({name})")
    if size != len(out):
        raise CorruptCheckpointError(f"decompresses to {size} bytes, fewer than the {len(out)} expected")


def _read_exactly(reader: zstandard.ZstdDecompressionReader, out: memoryview) -> None:
    """Fill ``out`` with the next bytes ``reader`` decompresses; CorruptCheckpointError if
    they do not decode or end first."""
    got = 0
    try:
        while got < len(out):
            n = reader.readinto(out[got:])
            if not n:
                raise CorruptCheckpointError(f"decompresses to fewer bytes than the {len(out)} expected")
            got += n
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"does not decompress ({exc})") from exc


def _check_ended(reader: zstandard.ZstdDecompressionReader, size: int) -> None:
    """CorruptCheckpointError unless ``reader``, having given ``size`` bytes, has no more."""
    try:
        more = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"does not decompress ({exc})") from exc
    if more:
        raise CorruptCheckpointError(f"decompresses to more than the {size} bytes expected")


def _pixel(rows: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """The first ``k`` rows of ``m`` bytes of ``rows`` (back to back) as one channels-last
    pixel of ``k * m`` channels: ``channel_shuffle`` of it in ``k`` groups is the transpose
    of that k x m byte matrix, the bytes of ``m`` elements of ``k`` bytes whose byte ``r``
    is row ``r``. Torch runs it as a vectorized (SIMD) transpose; interleaving with strided
    byte copies is several times slower."""
    return rows.as_strided((1, k * m, 1, 1), (k * m, 1, k * m, k * m))


def decompress_into(stored: memoryview, codec: str, dtype: torch.dtype, out: torch.Tensor) -> None:
    """Decode the stored bytes of a tensor chunk into ``out``, a contiguous tensor of the
    chunk's raw bytes (any dtype). Raises CorruptCheckpointError (without naming the item:
    the caller adds where) when they do not decode to exactly its size.

    Byte planes are joined a piece of ``_PIECE`` bytes at a time: the piece's bytes of each
    plane are gathered into a small scratch, interleaved, and copied into ``out`` while all
    of it is still in the CPU's cache."""
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
    if not n:
        return
    stored = stored.cast("B")
    target = tensor_bytes(out).cast("B")
    # Plane j holds byte k-1-j: it fills row k-1-j of each piece, from bytes as they are
    # stored, or from a stream decompressing its frame. The first plane compressed (most
    # often the only one: sign and exponent) is decompressed at once into the last n bytes
    # of ``out``, without passing through zstd's own buffer: writing the pieces front to back
    # never reaches a byte of it before its piece has gathered it (piece i ends at byte
    # k * e of ``out``, where e <= n is the end of its elements; the bytes of the plane it
    # has not yet gathered begin at (k - 1) * n + e >= k * e).
    rows: list[tuple[int, memoryview | zstandard.ZstdDecompressionReader]] = []
    streams: list[zstandard.ZstdDecompressionReader] = []
    tail: memoryview | None = target[(k - 1) * n :]
    at = head
    for j, length in enumerate(lengths):
        piece = stored[at : at + length]
        at += length
        if length == n:
            rows.append((k - 1 - j, piece))
        elif tail is not None:
            _unzstd_into(piece, tail)
            rows.append((k - 1 - j, tail))
            tail = None
        else:
            _whole_frames(piece)
            stream = _decompressor(len(streams)).stream_reader(piece, read_across_frames=True)
            streams.append(stream)
            rows.append((k - 1 - j, stream))
    step = max(1, min(n, _PIECE // k))
    scratch, view = _scratch(k * step)
    pixel = _pixel(scratch, k, step)
    for start in range(0, n, step):
        m = min(step, n - start)
        for r, source in rows:
            if isinstance(source, memoryview):
                view[r * m : (r + 1) * m] = source[start : start + m]
            else:
                _read_exactly(source, view[r * m : (r + 1) * m])
        if m < step:
            pixel = _pixel(scratch, k, m)
        joined = torch.nn.functional.channel_shuffle(pixel, k)  # held: the view below does not
        target[start * k : (start + m) * k] = tensor_bytes(joined).cast("B")
    for stream in streams:
        _check_ended(stream, n)


def decompress_bytes(stored: memoryview, codec: str) -> bytes:
    """Decode an object's stored bytes (whose raw length the manifest does not record:
    its zstd frame declares it, as every frame torchstow writes does); CorruptCheckpointError
    when they do not decode to exactly that, or declare no length, or more than this
    machine's memory (a few hostile bytes must not claim gigabytes)."""
    if codec != ZSTD:
        raise CorruptCheckpointError(f"codec {codec!r} does not apply to an object's bytes")
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"does not decompress ({exc})") from exc
    if size < 0:
        raise CorruptCheckpointError("does not declare its decompressed size, as every frame written does")
    if size > _memory_bytes():
        raise CorruptCheckpointError(f"declares {size} bytes decompressed, more than this machine's memory")
    try:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(f"does not decompress to the {size} bytes it declares ({exc})") from exc
    except MemoryError as exc:
        raise CorruptCheckpointError(
            f"declares {size} bytes decompressed, more than can be allocated"
        ) from exc


def _memory_bytes() -> int:
    """This machine's physical memory in bytes (no limit where it cannot tell)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return sys.maxsize
