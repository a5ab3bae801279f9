"""``format_version=1`` from a chunk table: the version-1 document is made from the
table's columns (no key or location object per item), and it is byte for byte the one the
per-item encoder writes from the same table, for every kind of entry and location."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.format import codec
from torchstow.format.codec import decode_metadata, encode_manifest, encode_metadata
from torchstow.format.compression import CODECS
from torchstow.format.files import MANIFEST
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.format.table import TableLocations


def _chunk(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def _every_kind() -> Metadata:
    """Chunks with and without a location, block sizes of their own, digests, a codec,
    checksums past 2**31, a scalar, an empty tensor, inline and stored objects; the
    files first used out of their listing order."""
    f32 = TensorProperties(torch.float32)
    entries: dict[str, Any] = {
        "step": BytesStorageMetadata("json", {"n": [1, 2]}),
        "sharded": TensorStorageMetadata(
            f32, torch.Size((4, 2)), [_chunk((0, 0), (2, 2)), _chunk((2, 0), (1, 2)), _chunk((3, 0), (1, 2))]
        ),
        "whole": TensorStorageMetadata(
            TensorProperties(torch.int8, True), torch.Size((3,)), [_chunk((0,), (3,))]
        ),
        "scalar": TensorStorageMetadata(f32, torch.Size(()), [_chunk((), ())]),
        "empty": TensorStorageMetadata(f32, torch.Size((0, 5)), [_chunk((0, 0), (0, 5))]),
        "unplaced": TensorStorageMetadata(f32, torch.Size((2,)), [_chunk((0,), (2,))]),
        "blob": BytesStorageMetadata("torch"),
    }
    locations = {  # the table lists its files as these come: data-a-1 first
        MetadataIndex("whole", (0,)): StorageInfo("data-a-1-0.bin", 0, 3, (13,), 64, None, CODECS[0]),
        MetadataIndex("sharded", (0, 0)): StorageInfo("data-b-0-0.bin", 0, 16, (0xFFFFFFFF,), 64),
        MetadataIndex("sharded", (2, 0)): StorageInfo("data-a-1-0.bin", 64, 8, (2**31,), 32, "ab" * 32),
        MetadataIndex("scalar", ()): StorageInfo("data-b-0-0.bin", 128, 4, (7,), 64, "cd" * 32),
        MetadataIndex("empty", (0, 0)): StorageInfo("data-b-0-0.bin", 192, 0, (), 64),
        MetadataIndex("blob"): StorageInfo("data-b-0-0.bin", 256, 100, (14, 15), 64),
    }
    return Metadata(
        entries, storage_data=locations, user_metadata={"epoch": 3}, committed_at=1.5, save_id="s" * 32
    )


def _over_its_table(md: Metadata) -> Metadata:
    """``md`` as a version-2 manifest decodes: its locations the columns of its chunk table."""
    manifest, tables = encode_manifest(md, 2)
    found = decode_metadata(manifest, read_file=lambda n, _: tables.get(n))
    assert isinstance(found.storage_data, TableLocations)
    return found


def _both_ways(md: Metadata, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes]:
    """Version 1 from the columns (checked to be taken), and from one object per item."""
    calls = []
    columns = codec._v1_entries_of_table
    monkeypatch.setattr(codec, "_v1_entries_of_table", lambda *a: calls.append(1) or columns(*a))
    fast = encode_metadata(md)
    assert calls == [1]  # the columns' path
    monkeypatch.setattr(codec, "_same_table", lambda *a: False)
    return fast, encode_metadata(md)


def test_every_kind_of_entry_and_location_is_written_as_item_by_item(monkeypatch: pytest.MonkeyPatch) -> None:
    md = _over_its_table(_every_kind())
    fast, slow = _both_ways(md, monkeypatch)
    assert fast == slow
    doc = json.loads(fast)
    assert doc["files"] == ["data-b-0-0.bin", "data-a-1-0.bin"]  # by first use, as before
    assert doc["entries"]["sharded"]["chunks"][0]["crc32c"] == [0xFFFFFFFF]  # unsigned
    assert "file" not in doc["entries"]["unplaced"]
    back = decode_metadata(fast)
    assert back.state_dict_metadata.keys() == md.state_dict_metadata.keys()
    assert dict(back.storage_data) == dict(md.storage_data)


def test_saved_checkpoints_convert_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real saves: compressed, and incremental (digests, files shared with the base)."""
    torch.manual_seed(0)
    state = {"a": torch.randn(300, 40), "b": torch.randn(10), "c": torch.arange(5), "n": 7, "s": "x"}
    torchstow.save(state, str(tmp_path / "base"), compression="zstd")
    state["b"] = torch.randn(10)
    torchstow.save(state, str(tmp_path / "next"), base=str(tmp_path / "base"))
    for name in ("base", "next"):
        where = tmp_path / name
        md = decode_metadata(
            (where / MANIFEST).read_bytes(), read_file=lambda n, _, w=where: (w / n).read_bytes()
        )
        fast, slow = _both_ways(md, monkeypatch)
        monkeypatch.undo()
        assert fast == slow, name
