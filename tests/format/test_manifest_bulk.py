"""The manifest's fast paths keep the format and the rules: the bytes written are version 1
as documented, and the bulk check of chunked tensors never accepts what the entry-by-entry
validator refuses (nor refuses with another message)."""

from __future__ import annotations

import json
import os
from typing import Any

import crc32c
import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchstow
from torchstow.format.bulk import chunked_entries_ok
from torchstow.format.codec import decode_metadata, encode_metadata
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
    new_storage_info,
)
from torchstow.format.schema import PlainDocument, RangedDocument
from torchstow.format.validation import check_manifest

BLOCK = 64


def _chunk(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def _metadata() -> Metadata:
    """Every kind of entry: a tensor in chunks (one with a block size and a digest of its
    own, one without a location), a whole tensor, an inline object, a stored object."""
    f32 = TensorProperties(torch.float32)
    entries: dict[str, Any] = {
        "sharded": TensorStorageMetadata(
            f32, torch.Size((4, 2)), [_chunk((0, 0), (2, 2)), _chunk((2, 0), (1, 2)), _chunk((3, 0), (1, 2))]
        ),
        "whole": TensorStorageMetadata(
            TensorProperties(torch.int8, True), torch.Size((3,)), [_chunk((0,), (3,))]
        ),
        "step": BytesStorageMetadata("json", {"n": [1, 2]}),
        "blob": BytesStorageMetadata("torch"),
    }
    locations = {
        MetadataIndex("sharded", (0, 0)): StorageInfo("data-a-0-0.bin", 0, 16, (11,), BLOCK),
        MetadataIndex("sharded", (2, 0)): StorageInfo("data-a-1-0.bin", 64, 8, (12,), 32, "ab" * 32),
        MetadataIndex("whole", (0,)): StorageInfo("data-a-1-0.bin", 0, 3, (13,), BLOCK),
        MetadataIndex("blob"): StorageInfo("data-a-0-0.bin", 64, 100, (14, 15), BLOCK),
    }
    return Metadata(entries, storage_data=locations, user_metadata={"epoch": 3}, committed_at=1.5)


def test_the_encoded_manifest_is_version_1_as_documented() -> None:
    data = encode_metadata(_metadata())
    doc = json.loads(data)
    assert (doc["format"], doc["version"], doc["checksum"]) == (
        "torchstow",
        1,
        {"algorithm": "crc32c", "block_size": BLOCK},
    )
    assert doc["files"] == ["data-a-0-0.bin", "data-a-1-0.bin"]
    assert doc["entries"] == {
        "sharded": {
            "dtype": "float32",
            "shape": [4, 2],
            "chunks": [
                {"file": 0, "offset": 0, "length": 16, "crc32c": [11], "offsets": [0, 0], "sizes": [2, 2]},
                {
                    "file": 1,
                    "offset": 64,
                    "length": 8,
                    "crc32c": [12],
                    "block": 32,
                    "blake3": "ab" * 32,
                    "offsets": [2, 0],
                    "sizes": [1, 2],
                },
                {"offsets": [3, 0], "sizes": [1, 2]},
            ],
        },
        "whole": {
            "file": 1,
            "offset": 0,
            "length": 3,
            "crc32c": [13],
            "dtype": "int8",
            "shape": [3],
            "requires_grad": True,
        },
        "step": {"encoding": "json", "value": {"n": [1, 2]}},
        "blob": {"file": 0, "offset": 64, "length": 100, "crc32c": [14, 15], "encoding": "torch"},
    }
    # A location's keys come first, in the order older versions wrote them.
    assert b'{"file":1,"offset":64,"length":8,"crc32c":[12],"block":32,"blake3":' in data


def test_a_decoded_manifest_equals_the_saved_one() -> None:
    md = _metadata()
    got = decode_metadata(encode_metadata(md))
    assert got.state_dict_metadata == md.state_dict_metadata
    assert got.storage_data == md.storage_data
    for index, info in got.storage_data.items():
        assert type(index) is MetadataIndex and type(info) is StorageInfo
        assert hash(index) == hash(MetadataIndex(index.fqn, index.offset))
    assert (got.user_metadata, got.committed_at, got.version) == ({"epoch": 3}, 1.5, 1)


def test_the_fast_constructors_make_equal_objects() -> None:
    info = new_storage_info("data-x.bin", 1, 2, (3,), 4, None)
    assert info == StorageInfo("data-x.bin", 1, 2, (3,), 4) and hash(info) == hash(
        StorageInfo("data-x.bin", 1, 2, (3,), 4)
    )
    with pytest.raises(AttributeError):
        info.offset = 5  # type: ignore[misc]
    index = MetadataIndex.of_chunk("w", torch.Size((2, 0)), 1)
    assert index == MetadataIndex("w", (2, 0)) and hash(index) == hash(MetadataIndex("w", (2, 0)))
    assert index.index == 1 and repr(index) == "MetadataIndex('w', offset=(2, 0))"


def test_tensors_sharing_a_layout_share_their_chunk_objects_but_not_their_lists() -> None:
    md = _metadata()
    md.state_dict_metadata["twin"] = TensorStorageMetadata(
        TensorProperties(torch.float32), torch.Size((4, 2)), list(md.state_dict_metadata["sharded"].chunks)
    )
    got = decode_metadata(encode_metadata(md)).state_dict_metadata
    assert got["twin"].chunks == got["sharded"].chunks
    assert got["twin"].chunks is not got["sharded"].chunks
    assert all(a is b for a, b in zip(got["twin"].chunks, got["sharded"].chunks, strict=True))


# The bulk check against the entry-by-entry validator, on a tensor of 6 x 2 float32 in row chunks.

_ROWS = [(0, 1), (1, 3), (3, 6)]


def _doc(block: int = 8) -> dict[str, Any]:
    chunks = [
        {
            "file": i % 2,
            "offset": 64 * i,
            "length": (end - start) * 8,
            "crc32c": [0] * -(-(end - start) * 8 // block),
            "offsets": [start, 0],
            "sizes": [end - start, 2],
        }
        for i, (start, end) in enumerate(_ROWS)
    ]
    entry = {"dtype": "float32", "shape": [6, 2], "chunks": chunks}
    return {
        "format": "torchstow",
        "version": 1,
        "checksum": {"algorithm": "crc32c", "block_size": block},
        "files": ["data-a-0-0.bin", "data-a-1-0.bin"],
        "entries": {"w": entry, "v": json.loads(json.dumps(entry))},
    }


_FIELDS = ["file", "offset", "length", "crc32c", "block", "offsets", "sizes", "blake3"]
_VALUES = st.one_of(
    st.integers(min_value=-3, max_value=20),
    st.sampled_from([2**63, 2**32, None, 1.5, "x"]),
    st.lists(st.integers(min_value=-2, max_value=8), max_size=3),
)


def _reference_error(data: bytes) -> str | None:
    """What the entry-by-entry validator says of ``data``: its message, or None if valid."""
    try:
        doc = msgspec.json.decode(data, type=PlainDocument)
    except msgspec.ValidationError:
        return "type"
    try:
        check_manifest(
            files=doc.files,
            block_size=doc.checksum.block_size,
            entries=doc.entries,
            planner_data=doc.planner_data,
            free_values=[],
        )
    except torchstow.CorruptCheckpointError as exc:
        return str(exc)
    return None


@settings(max_examples=300, deadline=None)
@given(
    block=st.sampled_from([0, 4, 8, 64]),
    edits=st.lists(
        st.tuples(st.integers(0, len(_ROWS) - 1), st.sampled_from(_FIELDS), _VALUES), min_size=0, max_size=3
    ),
    drop=st.sampled_from([None, "file", "crc32c", "offset"]),
)
def test_the_bulk_check_accepts_only_what_the_validator_accepts(
    block: int, edits: list[tuple[int, str, Any]], drop: str | None
) -> None:
    doc = _doc(block or 8)
    doc["checksum"]["block_size"] = block
    chunks = doc["entries"]["w"]["chunks"]
    for i, field, value in edits:
        chunks[i][field] = value
    if drop is not None:
        chunks[0].pop(drop, None)
    data = json.dumps(doc).encode()
    expected = _reference_error(data)
    try:
        ranged = msgspec.json.decode(data, type=RangedDocument)
    except msgspec.ValidationError:
        ranged = None
    if ranged is not None and "w" in chunked_entries_ok(ranged.entries, 2, block):
        assert expected is None, f"the bulk check accepted what the validator refuses: {expected}"
    if expected is None:
        decode_metadata(data)
        return
    with pytest.raises(torchstow.CorruptCheckpointError) as info:
        decode_metadata(data)
    if expected != "type":
        assert expected in str(info.value)


def test_a_valid_layout_is_accepted_in_bulk_and_each_broken_rule_is_explained() -> None:
    doc = _doc()
    ranged = msgspec.json.decode(json.dumps(doc).encode(), type=RangedDocument)
    accepted = chunked_entries_ok(ranged.entries, 2, 8)
    assert set(accepted) == {"w", "v"}
    assert accepted["w"] is accepted["v"]  # one layout, one list of chunk objects
    assert [tuple(c.offsets) for c in accepted["w"]] == [(0, 0), (1, 0), (3, 0)]
    broken = {
        "cover 10 elements of the 12": lambda c: c[2].update(sizes=[2, 2], length=16, crc32c=[0, 0]),
        "overlap": lambda c: c[1].update(offsets=[0, 0]),
        "beyond the shape": lambda c: c[2].update(offsets=[4, 0]),
        "length is 9 bytes": lambda c: c[0].update(length=9, crc32c=[0, 0]),
        "crc32c has 2 checksums": lambda c: c[0].update(crc32c=[0, 0]),
        "file is 2": lambda c: c[1].update(file=2),
        r"offsets\[0\] is -1": lambda c: c[1].update(offsets=[-1, 0]),
    }
    for message, change in broken.items():
        doc = _doc()
        change(doc["entries"]["v"]["chunks"])
        with pytest.raises(torchstow.CorruptCheckpointError, match=rf"entries\['v'\].*{message}"):
            decode_metadata(json.dumps(doc).encode())


@pytest.mark.parametrize("explicit_block", [False, True])
def test_a_manifest_as_other_writers_lay_it_out_reads_back_exactly(
    tmp_path: Any, explicit_block: bool
) -> None:
    """Keys in another order, chunks listed out of order, no optional keys, and (the slow
    path) a chunk stating the default block size: the same version 1, read bit-exact."""
    path = str(tmp_path / "ckpt")
    w = torch.arange(24.0).reshape(8, 3)
    torchstow.save({"w": w, "n": 5}, path, format_version=1)
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        doc = json.load(f)
    entry = doc["entries"]["w"]
    row = 3 * 4
    chunks = []
    for start, end in [(6, 8), (0, 1), (1, 6)]:
        chunk = {
            "offsets": [start, 0],
            "sizes": [end - start, 3],
            "crc32c": [int(crc32c.crc32c(w[start:end].numpy().tobytes()))],
            "length": (end - start) * row,
            "offset": entry["offset"] + start * row,
            "file": entry["file"],
        }
        if explicit_block:
            chunk["block"] = doc["checksum"]["block_size"]
        chunks.append(chunk)
    doc["entries"]["w"] = {"shape": [8, 3], "chunks": chunks, "dtype": "float32"}
    for optional in ("save_id", "nbytes_written", "save_seconds"):
        doc.pop(optional, None)
    with open(manifest, "w") as f:
        json.dump(doc, f)
    got = torchstow.read(path)
    assert torch.equal(got["w"], w) and got["n"] == 5
