"""Checksums of stored bytes: the registry of algorithms a manifest may name.

A manifest states its algorithm (``checksum.algorithm``) and one checksum per
``block_size`` bytes of each item; readers look the algorithm up here and
refuse a manifest naming one they do not know, rather than reporting every
block as corrupt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import crc32c

from torchstow.errors import FormatVersionError

__all__ = ["CHECKSUMS", "DEFAULT_ALGORITHM", "BlockVerifier", "Checksum", "check_algorithm", "checksum"]

Checksum = Callable[[Any, int], int]
"""``fn(data, running)``: the checksum of ``data`` continuing from ``running`` (0 to start)."""

CHECKSUMS: dict[str, Checksum] = {"crc32c": crc32c.crc32c}
DEFAULT_ALGORITHM = "crc32c"

checksum: Checksum = CHECKSUMS[DEFAULT_ALGORITHM]
"""The algorithm new checkpoints are written with."""


def check_algorithm(name: str) -> Checksum:
    """The checksum function called ``name``; FormatVersionError when unknown."""
    fn = CHECKSUMS.get(name)
    if fn is None:
        raise FormatVersionError(
            f"the manifest's checksums use {name!r}, which this torchstow does not know "
            f"(it knows {', '.join(sorted(CHECKSUMS))}): upgrade torchstow to read it"
        )
    return fn


class BlockVerifier:
    """Checks an item's bytes against its per-block checksums as they arrive, in order.

    The bytes fed start at block ``first_block`` and must end at a block
    boundary or at the item's end.
    """

    __slots__ = ("block", "block_size", "crc", "expected", "filled", "fn")

    def __init__(
        self, first_block: int, expected: Sequence[int], block_size: int, fn: Checksum = checksum
    ) -> None:
        self.block = first_block
        self.expected = expected
        self.block_size = block_size
        self.fn = fn
        self.crc = 0
        self.filled = 0

    def feed(self, data: memoryview) -> int | None:
        """Take the next bytes; the index of a block that failed, else None."""
        pos = 0
        size = len(data)
        while pos < size:
            take = min(self.block_size - self.filled, size - pos)
            chunk = data if take == size else data[pos : pos + take]
            self.crc = self.fn(chunk, self.crc)
            self.filled += take
            pos += take
            if self.filled == self.block_size:
                if self.crc != self.expected[self.block]:
                    return self.block
                self.block += 1
                self.crc = 0
                self.filled = 0
        return None

    def end(self) -> int | None:
        """Check the final, partial block; the index of a failed block, else None."""
        if self.filled and self.crc != self.expected[self.block]:
            return self.block
        return None
