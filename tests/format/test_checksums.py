"""The checksum function is CRC-32C (Castagnoli) exactly, however the bytes are split."""

from __future__ import annotations

import crc32c
import torch

from torchstow.format.checksums import BlockVerifier, checksum


def test_checksum_is_crc32c_as_an_independent_implementation_computes_it() -> None:
    assert checksum(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert checksum(b"") == 0
    data = memoryview(torch.randint(0, 256, ((5 << 20) + 13,), dtype=torch.uint8).numpy())
    assert checksum(data) == crc32c.crc32c(data)
    # A running value continues across any split, as block verification feeds it.
    for cut in (1, 7, 4096, 1 << 20, len(data) - 3):
        assert checksum(data[cut:], checksum(data[:cut])) == crc32c.crc32c(data)
    assert checksum(data[:0], 12345) == 12345


def test_a_block_verifier_fed_in_odd_pieces_finds_the_one_bad_block() -> None:
    block = 1 << 20
    data = bytearray(torch.randint(0, 256, (3 * block + 100,), dtype=torch.uint8).numpy().tobytes())
    expected = [crc32c.crc32c(data[i : i + block]) for i in range(0, len(data), block)]
    data[2 * block + 5] ^= 0x10
    verifier = BlockVerifier(0, expected, block)
    view = memoryview(data)
    bad = [verifier.feed(view[i : i + 300_001]) for i in range(0, len(view), 300_001)]
    assert [b for b in bad if b is not None] == [2]
    assert verifier.end() is None
    assert verifier.failed == [2]


def test_a_block_verifier_fed_pieces_that_end_on_block_boundaries_names_each_bad_block() -> None:
    # The reader's common case: pieces of a quarter block, the fourth of each ending its block.
    block, piece = 1 << 16, 1 << 14
    data = bytearray(torch.randint(0, 256, (5 * block,), dtype=torch.uint8).numpy().tobytes())
    expected = [crc32c.crc32c(data[i : i + block]) for i in range(0, len(data), block)]
    data[2 * block - 1] ^= 0x01  # the last byte of block 1: in the piece that ends it
    data[3 * block + piece + 3] ^= 0x80  # inside block 3's second piece
    verifier = BlockVerifier(0, expected, block)
    view = memoryview(data)
    bad = [verifier.feed(view[i : i + piece]) for i in range(0, len(view), piece)]
    assert [(i, b) for i, b in enumerate(bad) if b is not None] == [(7, 1), (15, 3)]
    assert verifier.end() is None
    assert verifier.failed == [1, 3]
