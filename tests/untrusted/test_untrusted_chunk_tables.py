"""Hostile version-2 chunk tables: every rule of docs/format.md refused by its reader,
naming the table, the row and the entry, before anything acts on it."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

import blake3
import pytest
import torch

import torchstow
from torchstow.format.codec import decode_metadata, encode_manifest
from torchstow.format.manifest import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.format.table import HEADER, _places

COLUMNS = ("entry", "file", "offset", "length", "block")


def _metadata() -> Metadata:
    """Two tensors (one in two row-chunks, one whole) and a torch-encoded object."""
    f32 = TensorProperties(torch.float32)
    half = torch.Size((2, 3))
    entries: dict[str, Any] = {
        "w": TensorStorageMetadata(
            f32,
            torch.Size((4, 3)),
            [ChunkStorageMetadata(torch.Size((0, 0)), half), ChunkStorageMetadata(torch.Size((2, 0)), half)],
        ),
        "b": TensorStorageMetadata(
            f32, torch.Size((3,)), [ChunkStorageMetadata(torch.Size((0,)), torch.Size((3,)))]
        ),
    }
    from torchstow.format.manifest import BytesStorageMetadata

    entries["o"] = BytesStorageMetadata("torch")
    name = "data-abc-0-0.bin"
    storage = {
        MetadataIndex("w", (0, 0)): StorageInfo(name, 0, 24, (11,), 4096, "ab" * 32),
        MetadataIndex("w", (2, 0)): StorageInfo(name, 64, 24, (12,), 4096),
        MetadataIndex("b", (0,)): StorageInfo(name, 128, 12, (13,), 4096),
        MetadataIndex("o"): StorageInfo("data-abc-0-1.bin", 0, 9000, (1, 2, 3), 4096),
    }
    return Metadata(entries, storage_data=storage, save_id="feed")


def _encoded() -> tuple[dict[str, Any], str, bytearray]:
    manifest, tables = encode_manifest(_metadata())
    ((name, table),) = tables.items()
    return json.loads(manifest), name, bytearray(table)


def _decode(doc: dict[str, Any], name: str, table: bytes, *, reseal: bool = True) -> Metadata:
    """Decode ``doc`` with ``table`` as its chunk table (its length and digest made to match)."""
    if reseal:
        doc["chunk_table"].update(length=len(table), blake3=blake3.blake3(bytes(table)).hexdigest())
    return decode_metadata(
        json.dumps(doc).encode(), source="m", read_file=lambda n, _: {name: bytes(table)}.get(n)
    )


def _column(table: bytearray, column: str, row: int, value: int) -> None:
    """Set row ``row`` of an int64 column (or ``offsets``/``sizes`` value ``row``)."""
    counts = struct.unpack_from("<4Q", table, 16)
    place = _places(*counts)[0][column]
    struct.pack_into("<q", table, place.offset + 8 * row, value)


def _refused(change: Callable[[dict[str, Any], bytearray], Any], pattern: str, reseal: bool = True) -> None:
    doc, name, table = _encoded()
    change(doc, table)
    with pytest.raises(torchstow.CorruptCheckpointError, match=pattern):
        _decode(doc, name, table, reseal=reseal)


def test_an_untouched_table_decodes_to_what_was_encoded() -> None:
    doc, name, table = _encoded()
    got = _decode(doc, name, table)
    want = _metadata()
    assert dict(got.storage_data.items()) == want.storage_data
    assert got.state_dict_metadata == want.state_dict_metadata


def test_a_missing_table_is_corruption() -> None:
    doc, _, _ = _encoded()
    with pytest.raises(
        torchstow.CorruptCheckpointError, match=r"chunk table manifest-feed.chunks is missing"
    ):
        decode_metadata(json.dumps(doc).encode(), read_file=lambda n, _: None)


def test_a_truncated_table_is_refused_by_its_recorded_length() -> None:
    _refused(
        lambda doc, t: t.__delitem__(slice(-8, None)), r"is \d+ bytes; the manifest records \d+", reseal=False
    )


def test_a_table_whose_bytes_do_not_match_the_digest_is_refused() -> None:
    _refused(lambda doc, t: _column(t, "offset", 0, 7), r"does not match the BLAKE3 digest", reseal=False)


def test_a_truncated_table_resealed_is_refused_by_its_header() -> None:
    _refused(lambda doc, t: t.__delitem__(slice(-8, None)), r"header's counts make")


def test_a_table_shorter_than_its_header() -> None:
    _refused(lambda doc, t: t.__delitem__(slice(10, None)), r"shorter than its 64-byte header")


def test_wrong_magic_and_version_and_reserved_fields() -> None:
    _refused(lambda doc, t: t.__setitem__(slice(0, 8), b"NOTATABL"), r"not a chunk table")
    _refused(lambda doc, t: struct.pack_into("<I", t, 8, 9), r"table version 9")
    _refused(lambda doc, t: struct.pack_into("<I", t, 12, 1), r"reserved header fields")


def test_header_counts_past_the_bytes_allocate_nothing() -> None:
    # 2**60 rows: refused from the header alone, before any column is sized by it.
    _refused(
        lambda doc, t: struct.pack_into("<Q", t, 16, 1 << 60), r"counts more values than the table has bytes"
    )
    _refused(lambda doc, t: struct.pack_into("<Q", t, 16, 5), r"header's counts make")


def test_a_table_for_other_entries() -> None:
    _refused(
        lambda doc, t: doc["entries"].update(extra={"encoding": "json", "value": 1}), r"is for 3 entries"
    )


@pytest.mark.parametrize(
    ("column", "row", "value", "pattern"),
    [
        ("entry", 0, 7, r"row 0: entry 7 is not an index into the entries"),
        ("entry", 0, -1, r"row 0: entry -1 is not an index"),
        ("entry", 0, 1, r"row 1 \(entries\['w'\]\): rows are not in the order of their entries"),
        ("entry", 3, 1, r"holds 5 chunk dimensions; its rows need 6"),
        ("file", 1, 2, r"row 1 \(entries\['w'\]\): file 2 is not an index into 'files' \(2 names\)"),
        ("file", 1, -2, r"row 1 \(entries\['w'\]\): file -2 is not an index"),
        ("offset", 1, -64, r"row 1 \(entries\['w'\]\): offset -64 is negative"),
        ("length", 2, -12, r"row 2 \(entries\['b'\]\): length -12 is negative"),
        ("block", 0, -1, r"row 0 \(entries\['w'\]\): block -1 is negative"),
        ("offset", 0, (1 << 63) - 10, r"row 0 \(entries\['w'\]\): offset .* \+ length 24 passes 2\*\*63 - 1"),
        ("length", 1, 28, r"row 1 \(entries\['w'\]\): length is 28 bytes, but its elements take 24"),
        ("block", 2, 4, r"holds 6 crc32c values; its rows' lengths and blocks need 8"),
        ("block", 2, 0, r"row 2 \(entries\['b'\]\): 12 bytes with a checksum block size of 0"),
    ],
)
def test_out_of_range_values_name_the_row_and_entry(column: str, row: int, value: int, pattern: str) -> None:
    _refused(lambda doc, t: _column(t, column, row, value), pattern)


@pytest.mark.parametrize(
    ("at", "value", "pattern"),
    [
        (
            0,
            -1,
            r"row 0 \(entries\['w'\]\): the chunk \(offset -1, size 2 in dimension 0\) leaves the shape's 4",
        ),
        (
            2,
            3,
            r"row 1 \(entries\['w'\]\): the chunk \(offset 3, size 2 in dimension 0\) leaves the shape's 4",
        ),
        (2, 1, r"entries\['w'\]: chunks at \[0, 0\] and \[1, 0\] overlap"),
        (4, 1, r"row 2 \(entries\['b'\]\): the chunk \(offset 1, size 3 in dimension 0\) leaves"),
        (2, (1 << 63) - 1, r"leaves the shape's 4"),
    ],
)
def test_chunks_outside_the_shape_or_overlapping(at: int, value: int, pattern: str) -> None:
    _refused(lambda doc, t: _column(t, "offsets", at, value), pattern)


def test_gapped_chunks_are_refused() -> None:
    # w's second chunk shrunk to one row (its length to match): the chunks leave a gap.
    def gap(doc: dict[str, Any], table: bytearray) -> None:
        _column(table, "sizes", 2, 1)
        _column(table, "length", 1, 12)

    _refused(gap, r"entries\['w'\]: the chunks cover 9 elements of the 12 in shape \[4, 3\]")


def test_a_json_object_with_a_row_and_an_object_with_two() -> None:
    _refused(
        lambda doc, t: doc["entries"]["o"].update(encoding="json"),
        r"entries\['o'\] is an inline \(json\) object",
    )


def test_wrong_codec_and_digest_flags() -> None:
    def codec(doc: dict[str, Any], table: bytearray) -> None:
        counts = struct.unpack_from("<4Q", table, 16)
        table[_places(*counts)[0]["codec"].offset] = 2

    def flag(doc: dict[str, Any], table: bytearray) -> None:
        counts = struct.unpack_from("<4Q", table, 16)
        table[_places(*counts)[0]["has_digest"].offset + 1] = 1

    _refused(codec, r"row 0 \(entries\['w'\]\): codec 2; 'codecs' names 0")
    _refused(flag, r"holds 1 digests; its rows' flags need 2")


def test_a_table_name_that_leaves_the_checkpoint() -> None:
    for name in ("../manifest-x.chunks", "data-x.bin", "/etc/passwd"):
        _refused(lambda doc, t, n=name: doc["chunk_table"].update(name=n), r"not a plain chunk-table name")


def test_a_saved_checkpoint_with_a_damaged_table_fails_every_reader(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    torchstow.save({"w": torch.arange(12.0).reshape(4, 3), "n": 3}, path)
    (name,) = [n for n in os.listdir(path) if n.endswith(".chunks")]
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(HEADER.size + 3)
        f.write(b"\xff")
    for call in (lambda: torchstow.read(path), lambda: torchstow.info(path)):
        with pytest.raises(torchstow.CorruptCheckpointError, match=r"does not match the BLAKE3 digest"):
            call()
    os.remove(os.path.join(path, name))
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"is missing"):
        torchstow.load({"w": torch.zeros(4, 3), "n": 0}, path)


def test_codec_names_this_torchstow_does_not_decode_and_misplaced_byte_planes() -> None:
    def unknown(doc: dict[str, Any], table: bytearray) -> None:
        doc["codecs"] = ["lz4-frame"]

    def planes_of_an_object(doc: dict[str, Any], table: bytearray) -> None:
        doc["codecs"] = ["byteplanes-zstd"]
        counts = struct.unpack_from("<4Q", table, 16)
        table[_places(*counts)[0]["codec"].offset + 3] = 1  # row 3: the object "o"

    _refused(unknown, r"codecs\[0\] = 'lz4-frame' is not one this torchstow knows")
    _refused(planes_of_an_object, r"row 3 \(entries\['o'\]\): codec 'byteplanes-zstd' needs a tensor")
