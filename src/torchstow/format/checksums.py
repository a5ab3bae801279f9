"""Checksums of stored bytes: CRC-32C (Castagnoli), one per ``block_size`` bytes of an item.

Format version 1 has this one algorithm: the manifest records it
(``checksum.algorithm``, always ``"crc32c"``) beside lists named ``crc32c``.
A reader refuses a manifest naming another one (a later torchstow's) rather
than reporting every block as corrupt; another algorithm would be a new
format version.

The implementation is the AWS Common Runtime's (``awscrt``): it folds with
carry-less multiplies over vector registers where the CPU has them (about 50
GiB/s per core with AVX-512 VPCLMULQDQ, twice the SSE4.2 ``crc32`` instruction's
speed), and releases the GIL while it runs, so reader threads verify in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence

from awscrt.checksums import crc32c as checksum

from torchstow.errors import FormatVersionError

__all__ = ["ALGORITHM", "BlockVerifier", "block_bytes", "block_span", "check_algorithm", "checksum"]

ALGORITHM = "crc32c"
"""The algorithm of every checksum in a manifest (``checksum(data, running)``: 0 to start)."""


def check_algorithm(name: str) -> None:
    """FormatVersionError unless a manifest's ``checksum.algorithm`` is :data:`ALGORITHM`."""
    if name != ALGORITHM:
        raise FormatVersionError(
            f"the manifest's checksums use {name!r}, which this torchstow does not know "
            f"(it knows {ALGORITHM}): upgrade torchstow to read it"
        )


def block_bytes(block_size: int, length: int) -> int:
    """The bytes each checksum of an item of ``length`` bytes covers: its ``block_size``,
    or the whole item when that is 0."""
    return block_size or max(length, 1)


def block_span(block: int, block_size: int, length: int) -> tuple[int, int]:
    """Where checksum block ``block`` of an item of ``length`` bytes lies in it: (start, end)."""
    size = block_bytes(block_size, length)
    return block * size, min(length, (block + 1) * size)


class BlockVerifier:
    """Checks an item's bytes against its per-block checksums as they arrive, in order.

    The bytes fed start at block ``first_block`` and must end at a block
    boundary or at the item's end. A failed block does not stop it: every
    one is kept in ``failed``, for a scan that reports them all.
    """

    __slots__ = ("block", "block_size", "crc", "expected", "failed", "filled")

    def __init__(self, first_block: int, expected: Sequence[int], block_size: int) -> None:
        self.block = first_block
        self.expected = expected
        self.block_size = block_size
        self.crc = 0
        self.filled = 0
        self.failed: list[int] = []

    def feed(self, data: memoryview) -> int | None:
        """Take the next bytes; the index of the first block among them that failed, else None."""
        filled = self.filled + len(data)
        if filled < self.block_size:  # inside the block: the common piece of a read
            self.crc = checksum(data, self.crc)
            self.filled = filled
            return None
        if filled == self.block_size:  # the piece that ends its block, the next most common
            return self._close_block(checksum(data, self.crc))
        bad = None
        pos = 0
        size = len(data)
        while pos < size:
            take = min(self.block_size - self.filled, size - pos)
            chunk = data if take == size else data[pos : pos + take]
            self.crc = checksum(chunk, self.crc)
            self.filled += take
            pos += take
            if self.filled == self.block_size:
                failed = self._close_block(self.crc)
                if bad is None:
                    bad = failed
        return bad

    def _close_block(self, crc: int) -> int | None:
        """End the current block, whose bytes have checksum ``crc``: its index if that is
        not the one saved (kept in ``failed``), else None."""
        block = self.block
        self.block = block + 1
        self.crc = self.filled = 0
        if crc == self.expected[block]:
            return None
        self.failed.append(block)
        return block

    def end(self) -> int | None:
        """Check the final, partial block; the index of a failed block, else None."""
        if self.filled and self.crc != self.expected[self.block]:
            self.failed.append(self.block)
            return self.block
        return None
