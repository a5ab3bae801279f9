"""A huge or sparse small file (a manifest, its chunk table, DCP's ``.metadata``, a
safetensors index) is refused from its size, never read whole: a CorruptCheckpointError
naming it and the limit, at once, where reading an 8 GB one raised MemoryError or took
minutes; nothing at the location changes. And a few compressed bytes claiming gigabytes
are refused before anything is allocated for them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.cli import main
from torchstow.core.storage.store import ByteStore, read_capped
from torchstow.format.codec import decode_metadata, encode_manifest
from torchstow.format.compression import MAX_EXPANSION
from torchstow.format.files import CHUNK_TABLE_MAX_BYTES, DCP_METADATA, MANIFEST, MANIFEST_MAX_BYTES
from torchstow.format.manifest import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    TensorProperties,
    TensorStorageMetadata,
)
from torchstow.interop.sources import index_weight_map

SPARSE = 2 << 30  # over the limits of a manifest (1 GiB); a sparse file costs no disk


def _saved(path: Path, version: int = 2) -> Path:
    torchstow.save({"w": torch.arange(8.0), "step": 3}, path, format_version=version)
    return path


def _table(path: Path) -> Path:
    (table,) = path.glob("manifest-*.chunks")
    return table


def _listing(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in path.iterdir()}


@pytest.mark.parametrize("version", [1, 2])
def test_a_sparse_2_gb_manifest_is_refused_unread_by_every_reader(
    tmp_path: Path, version: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _saved(tmp_path / "ckpt", version)
    os.truncate(path / MANIFEST, SPARSE)  # its JSON, then 2 GB of zeros
    before = _listing(path)
    too_large = rf"{MANIFEST} holds more than {MANIFEST_MAX_BYTES:,} bytes"
    for call in (
        lambda: torchstow.read(path),
        lambda: torchstow.load({"w": torch.zeros(8), "step": 0}, path),
        lambda: torchstow.storage_reader(str(path)).read_metadata(),
    ):
        with pytest.raises(torchstow.CorruptCheckpointError, match=too_large):
            call()
    assert main(["info", str(path)]) != 0
    assert f"holds more than {MANIFEST_MAX_BYTES:,} bytes" in capsys.readouterr().err
    assert torchstow.latest(str(tmp_path)) is None  # skipped, as any unreadable checkpoint
    for where in (tmp_path, path):  # what it names is unknown: nothing there is debris
        report = torchstow.gc(str(where), older_than=0)
        assert report.removed == [] and "could not be read" in report.skipped[str(path)], report
    assert _listing(path) == before


def test_a_chunk_table_longer_than_its_manifest_records_is_refused_unread(tmp_path: Path) -> None:
    path = _saved(tmp_path / "ckpt")
    table = _table(path)
    recorded = table.stat().st_size
    os.truncate(table, recorded + (64 << 20))
    too_large = rf"{table.name} holds more than {recorded:,} bytes"
    with pytest.raises(torchstow.CorruptCheckpointError, match=too_large):
        torchstow.read(path)
    assert table.stat().st_size == recorded + (64 << 20)


@pytest.mark.parametrize(
    ("length", "refusal"),
    [(CHUNK_TABLE_MAX_BYTES + 1, f"more than {CHUNK_TABLE_MAX_BYTES:,} bytes"), (-5, "-5 is negative")],
)
def test_a_manifest_recording_a_chunk_table_length_out_of_range_is_refused_before_reading_it(
    tmp_path: Path, length: int, refusal: str
) -> None:
    path = _saved(tmp_path / "ckpt")
    doc = json.loads((path / MANIFEST).read_text())
    doc["chunk_table"]["length"] = length
    (path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(torchstow.CorruptCheckpointError, match=refusal):
        torchstow.read(path)


def test_a_sparse_2_gb_dcp_metadata_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "dcp"
    path.mkdir()
    (path / DCP_METADATA).touch()
    os.truncate(path / DCP_METADATA, SPARSE)
    with pytest.raises(torchstow.CorruptCheckpointError, match=rf"\{DCP_METADATA} holds more than"):
        torchstow.read(path)
    report = torchstow.verify(str(path))
    assert any("holds more than" in problem.message for problem in report.problems), report.problems


def test_a_sparse_2_gb_safetensors_index_is_refused_unread(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.touch()
    os.truncate(index, SPARSE)
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"index.json holds more than"):
        index_weight_map(str(index))


class _OldPlugin(LocalFileStore):
    """A store as a plugin written before ``read_small_file`` existed, which cannot tell
    file sizes either: the size comes from a one-byte read at the limit."""

    def file_sizes(self) -> None:
        return None

    read_small_file = ByteStore.read_small_file

    def read_file(self, name: str) -> bytes:
        self.read_whole.append(name)
        return super().read_file(name)


def test_a_store_that_implements_neither_size_nor_bounded_read_keeps_the_rule(tmp_path: Path) -> None:
    path = _saved(tmp_path / "ckpt")
    store = _OldPlugin(str(path), str(path))
    store.read_whole = []
    assert read_capped(store, MANIFEST, MANIFEST_MAX_BYTES) == (path / MANIFEST).read_bytes()
    os.truncate(path / MANIFEST, SPARSE)
    with pytest.raises(torchstow.CorruptCheckpointError, match="holds more than"):
        read_capped(store, MANIFEST, MANIFEST_MAX_BYTES)
    assert store.read_whole == [MANIFEST]  # the first, small, read only
    with pytest.raises(FileNotFoundError):
        read_capped(store, "missing.json", MANIFEST_MAX_BYTES)


def test_a_byte_transforming_wrapper_keeps_the_rule_from_the_size_at_rest(tmp_path: Path) -> None:
    from xor_wrapper import XorBackend, XorStore

    path = _saved(tmp_path / "ckpt")
    os.truncate(path / MANIFEST, SPARSE)
    store = XorStore(LocalFileStore(str(path), str(path)), XorBackend(**{"xor.key": 7}))
    with pytest.raises(torchstow.CorruptCheckpointError, match="holds more than"):
        read_capped(store, MANIFEST, MANIFEST_MAX_BYTES)


@pytest.mark.parametrize(
    ("limit", "version"),
    [("MANIFEST_MAX_BYTES", 1), ("MANIFEST_MAX_BYTES", 2), ("CHUNK_TABLE_MAX_BYTES", 2)],
)
def test_a_save_refuses_a_manifest_a_reader_would_refuse_and_the_old_one_stays(
    tmp_path: Path, limit: str, version: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchstow.format import codec

    path = _saved(tmp_path / "ckpt", version)
    before = _listing(path)
    monkeypatch.setattr(codec, limit, 100)  # every manifest (or chunk table) is larger
    with pytest.raises(torchstow.CheckpointException, match="more than the 100 a reader reads"):
        torchstow.save({"w": torch.ones(8)}, path, format_version=version, overwrite=True)
    assert _listing(path) == before
    monkeypatch.undo()
    assert torch.equal(torchstow.read(path)["w"], torch.arange(8.0))


def _squeezed(elements: int, version: int) -> Metadata:
    """A float32 tensor of ``elements`` stored in 4 zstd-compressed bytes, round-tripped
    through format ``version``."""
    entry = TensorStorageMetadata(
        TensorProperties(torch.float32),
        torch.Size((elements,)),
        [ChunkStorageMetadata(torch.Size((0,)), torch.Size((elements,)))],
    )
    where = StorageInfo("data-abc-0-0.bin", 0, 4, (7,), 4096, codec="zstd")
    md = Metadata({"w": entry}, storage_data={MetadataIndex("w", (0,)): where}, save_id="feed")
    manifest, tables = encode_manifest(md, version)
    return decode_metadata(manifest, source="m", read_file=lambda name, _: tables.get(name))


@pytest.mark.parametrize("version", [1, 2])
def test_a_compressed_chunk_claiming_more_than_its_bytes_can_hold_is_refused(version: int) -> None:
    """4 stored bytes hold at most one 128 KiB zstd block (32,768 float32s)."""
    assert _squeezed(MAX_EXPANSION, version).state_dict_metadata["w"].size == (MAX_EXPANSION,)
    one_more = rf"'w'.*no .*expands to the {4 * MAX_EXPANSION + 4} its elements take"
    with pytest.raises(torchstow.CorruptCheckpointError, match=one_more):
        _squeezed(MAX_EXPANSION + 1, version)


def test_reading_a_compressed_chunk_claiming_256_gib_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    torchstow.save({"w": torch.zeros(1 << 16)}, path, compression="zstd", format_version=1)
    doc = json.loads((path / MANIFEST).read_text())
    doc["entries"]["w"]["shape"] = [1 << 36]  # 256 GiB of float32 from about 100 stored bytes
    (path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"'w'.*no 'byteplanes-zstd' item expands"):
        torchstow.read(path)
