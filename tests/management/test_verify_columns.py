"""verify and copy walk a version-2 chunk table as columns: no object per item, the
same reports as a version-1 manifest's objects give, on a checkpoint of many chunks."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.core.layout.commit import publish_manifest
from torchstow.format.checksums import checksum
from torchstow.format.files import BLOCK_SIZE
from torchstow.format.manifest import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.format.table import ChunkTable, TableChunks
from torchstow.plugins.manager import default_registry

ROWS = 3000  # chunks of one tensor, one row of 4 float32 (16 bytes) each
FILES = ("data-cols-0-0.bin", "data-cols-0-1.bin")


def _place(i: int) -> tuple[str, int]:
    """Chunk ``i``'s file and offset: alternate files, each written back to front."""
    return FILES[i % 2], (ROWS // 2 - 1 - i // 2) * 16


def _many_chunks(
    path: Path, version: int, big: bool = False, unlocated: int | None = None
) -> tuple[str, torch.Tensor]:
    """A committed checkpoint of one tensor stored as ``ROWS`` chunks (and, with ``big``,
    a second tensor of three checksum blocks after them in the first file; chunk
    ``unlocated`` recorded without a location)."""
    value = torch.arange(ROWS * 4, dtype=torch.float32).reshape(ROWS, 4)
    raw = value.numpy().tobytes()
    files = {name: bytearray(ROWS // 2 * 16) for name in FILES}
    located: dict[MetadataIndex, StorageInfo] = {}
    for i in range(ROWS):
        name, offset = _place(i)
        piece = raw[i * 16 : (i + 1) * 16]
        files[name][offset : offset + 16] = piece
        located[MetadataIndex("t", (i, 0))] = StorageInfo(
            name, offset, 16, (checksum(piece),), BLOCK_SIZE, None
        )
    entries: dict[str, Any] = {
        "t": TensorStorageMetadata(
            TensorProperties(torch.float32),
            torch.Size([ROWS, 4]),
            [ChunkStorageMetadata(torch.Size([i, 0]), torch.Size([1, 4])) for i in range(ROWS)],
        )
    }
    if big:
        data = torch.arange(3 * BLOCK_SIZE // 4, dtype=torch.int32).numpy().tobytes()
        at = len(files[FILES[0]])
        files[FILES[0]] += data
        crcs = tuple(checksum(data[b : b + BLOCK_SIZE]) for b in range(0, len(data), BLOCK_SIZE))
        located[MetadataIndex("big", (0,))] = StorageInfo(FILES[0], at, len(data), crcs, BLOCK_SIZE, None)
        shape = torch.Size([len(data) // 4])
        entries["big"] = TensorStorageMetadata(
            TensorProperties(torch.int32), shape, [ChunkStorageMetadata(torch.Size([0]), shape)]
        )
    if unlocated is not None:
        del located[MetadataIndex("t", (unlocated, 0))]
    ckpt = path / f"v{version}"
    ckpt.mkdir()
    for name, data in files.items():
        (ckpt / name).write_bytes(data)
    store = default_registry().backend_for(str(ckpt), None).open_store(str(ckpt))
    md = Metadata(entries, storage_data=located, save_id=uuid.uuid4().hex)
    publish_manifest(store, md, overwrite=False, version=version)
    return str(ckpt), value


def _flip(ckpt: str, name: str, at: int) -> None:
    with open(os.path.join(ckpt, name), "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture
def per_row(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the chunk table's per-row accessors (an object made for one item)."""
    calls: Counter[str] = Counter()
    for cls, name in ((ChunkTable, "info"), (ChunkTable, "index_of"), (TableChunks, "_chunks")):
        original = getattr(cls, name)

        def counted(*args: Any, _original: Any = original, _name: str = name) -> Any:
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(cls, name, counted)
    return calls


def test_verify_and_copy_of_a_v2_checkpoint_make_no_object_per_item(
    tmp_path: Path, per_row: Counter[str]
) -> None:
    ckpt, value = _many_chunks(tmp_path, 2)
    report = torchstow.verify(ckpt)
    assert report.ok, report.problems
    assert (report.checked_bytes, report.files, report.keys) == (ROWS * 16, 2, 1)
    copied = torchstow.copy(ckpt, str(tmp_path / "copy"))
    assert torchstow.verify(copied).ok
    assert per_row == Counter()  # not one row made into objects
    assert torch.equal(torchstow.read(copied)["t"], value)


@pytest.mark.parametrize("version", [1, 2])
def test_one_bad_block_among_many_names_its_chunk(
    tmp_path: Path, version: int, per_row: Counter[str]
) -> None:
    ckpt, _ = _many_chunks(tmp_path, version, big=True)
    bad = 1777
    name, offset = _place(bad)
    _flip(ckpt, name, offset + 5)
    # "big" starts 24,000 bytes into its file: its first block crosses the scan's first 4 MiB segment
    big = ROWS // 2 * 16
    _flip(ckpt, FILES[0], (4 << 20) + 3)
    report = torchstow.verify(ckpt)
    found = sorted((p.key, p.file, p.offset, p.message) for p in report.problems)
    assert found == [
        (
            "big",
            FILES[0],
            big,
            f"checksum mismatch in bytes {big}..{big + BLOCK_SIZE}: they differ from what was saved",
        ),
        (
            f"t[chunk at [{bad}, 0]]",
            name,
            offset,
            f"checksum mismatch in bytes {offset}..{offset + 16}: they differ from what was saved",
        ),
    ]
    assert report.checked_bytes == (ROWS - 1) * 16
    if version == 2:
        assert per_row["index_of"] == 2  # the two reported rows, no other
        assert per_row["info"] == 0
    with pytest.raises(torchstow.ChecksumMismatchError) as caught:
        torchstow.copy(ckpt, str(tmp_path / "copy"))
    assert "'big'" in str(caught.value) or f"t[chunk at [{bad}, 0]]" in str(caught.value)


@pytest.mark.parametrize("version", [1, 2])
def test_a_missing_file_names_each_of_its_chunks(tmp_path: Path, version: int) -> None:
    ckpt, _ = _many_chunks(tmp_path, version)
    os.remove(os.path.join(ckpt, FILES[1]))
    report = torchstow.verify(ckpt)
    odd = sorted(range(1, ROWS, 2), key=lambda i: _place(i)[1])  # in the order they lie in the file
    assert [(p.key, p.file, p.offset, p.message) for p in report.problems] == [
        (f"t[chunk at [{i}, 0]]", FILES[1], _place(i)[1], "the data file is missing") for i in odd
    ]
    assert report.checked_bytes == ROWS // 2 * 16


@pytest.mark.parametrize("version", [1, 2])
def test_a_chunk_without_a_location_is_reported_from_the_manifest(tmp_path: Path, version: int) -> None:
    ckpt, _ = _many_chunks(tmp_path, version, unlocated=2021)
    report = torchstow.verify(ckpt)
    assert [(p.key, p.file, p.offset, p.message) for p in report.problems] == [
        ("t", None, None, "no data location for chunk [2021, 0]")
    ]
    assert report.checked_bytes == (ROWS - 1) * 16
