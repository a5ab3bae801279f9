"""Compressed items (``save(..., compression="zstd")``): the codecs a location may name.

Each stored item (a tensor chunk, an object's bytes) is compressed on its own, so
any item can still be read without the others. A location's ``codec`` says how
its stored bytes were made from the item's raw bytes (absent: they are the raw bytes):

- ``"zstd"``: one Zstandard frame of the raw bytes.
- ``"byteplanes-zstd"`` (tensors whose dtype takes ``k`` > 1 bytes, in practice the
  floating-point and complex ones): the elements' bytes grouped by significance
  first. Plane ``j`` (0 <= j < k) holds byte ``k - 1 - j`` of every element's
  little-endian bytes, so plane 0 holds the sign and exponent bits of every
  element, which repeat a lot, and the noisy low mantissa bytes come last. The
  stored bytes are ``k`` little-endian unsigned 64-bit lengths, then the ``k``
  planes in order, each stored in that many bytes: a plane of exactly ``n`` bytes
  (the element count) is stored as it is, any shorter one is a Zstandard frame of it.

The raw length of a tensor chunk follows from its sizes and dtype; the item's
``length``, ``crc32c`` and ``blake3`` are those of the stored bytes. An item that
compression would not shrink is stored raw, without a codec.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BYTEPLANES",
    "CODECS",
    "COMPRESSIONS",
    "MAX_EXPANSION",
    "ZSTD",
    "check_compression",
    "expands_past",
]

ZSTD = "zstd"
BYTEPLANES = "byteplanes-zstd"
CODECS = (ZSTD, BYTEPLANES)
"""The codecs a location may name."""

MAX_EXPANSION = 1 << 15
"""The most raw bytes one stored byte of a compressed item can stand for: a Zstandard
block holds at most 128 KiB and takes at least 4 bytes (a run-length block), and a byte
plane stored as it is stands for itself."""


def expands_past(raw: Any, stored: Any) -> Any:
    """Whether ``raw`` bytes are more than any item compressed into ``stored`` (>= 0) bytes
    holds (:data:`MAX_EXPANSION`): for integers, or a column of each (int64 tensors), with
    no product that could overflow 64 bits."""
    return (raw - 1) // MAX_EXPANSION >= stored


COMPRESSIONS = (ZSTD,)
"""The values ``save(..., compression=)`` takes (besides None)."""


def check_compression(compression: Any) -> str | None:
    """``compression`` if a save can use it (None: store raw bytes); else ValueError."""
    if compression is None or (type(compression) is str and compression in COMPRESSIONS):
        return compression
    raise ValueError(
        f"compression={compression!r} is not a compression torchstow knows "
        f"(known: {', '.join(map(repr, COMPRESSIONS))}, or None for none)"
    )
