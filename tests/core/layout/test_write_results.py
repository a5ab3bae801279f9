"""Write results as columns: what a rank's layout writer hands the coordinator is a few
buffers whatever the number of items, reads back as the WriteResults it stands for, and
the coordinator builds the same chunk table from it as from WriteResult objects."""

from __future__ import annotations

import pickle
import pickletools
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.core.storage.interfaces import WrittenItems, location_columns
from torchstow.format.codec import decode_metadata, encode_manifest
from torchstow.format.located import LocationColumns, located_table
from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, StorageInfo
from torchstow.spi import ForwardingStorageWriter, WriteResult


class _Keeping(ForwardingStorageWriter):
    """Keeps what the inner writer's ``write_data`` gave."""

    given: Any = None

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = self.inner.write_data(plan, planner)
        self.given = future.result()
        return future


def _written(path: Path, count: int) -> Any:
    writer = _Keeping(torchstow.storage_writer(str(path)))
    state = {f"t{i}": torch.full((3, i % 4 + 1), float(i)) for i in range(count)}
    state["ids"] = {1, 2}  # an object stored in a file
    state["epoch"] = 3  # inline JSON: not written
    torchstow.save(state, storage_writer=writer)
    return writer.given


def _opcodes(value: Any) -> int:
    return sum(1 for _ in pickletools.genops(pickle.dumps(value)))


def test_a_rank_hands_over_its_results_as_a_few_buffers_whatever_the_number_of_items(tmp_path: Path) -> None:
    few, many = _written(tmp_path / "few", 3), _written(tmp_path / "many", 600)
    assert isinstance(many, WrittenItems) and len(many) == 601
    # The same pickle, only longer buffers: no object per item travels.
    assert _opcodes(few) == _opcodes(many) < 400
    assert _opcodes([*many]) > 600 * 5  # what a list of WriteResult objects would send


def test_the_columns_read_back_as_the_write_results_they_stand_for(tmp_path: Path) -> None:
    written = _written(tmp_path / "ckpt", 20)
    results = list(written)
    assert all(isinstance(r, WriteResult) and isinstance(r.storage_data, StorageInfo) for r in results)
    again = pickle.loads(pickle.dumps(written))
    assert list(again) == results
    assert [r.index.index for r in again] == [r.index.index for r in results]  # hints kept
    copy = location_columns(results)  # made from the objects: the same columns
    assert list(WrittenItems(copy)) == results
    stored = torchstow.storage_reader(str(tmp_path / "ckpt")).read_metadata().storage_data
    assert {r.index: r.storage_data for r in results} == dict(stored.items())


def test_a_write_result_without_a_storage_info_is_a_clear_error() -> None:
    result = WriteResult(MetadataIndex("w", (0,), 0), 4, {"path": "x"})
    with pytest.raises(TypeError, match=r"MetadataIndex\('w', offset=\(0,\)\) holds a dict"):
        location_columns([result])


def test_checksums_that_do_not_fit_the_length_and_block_are_refused() -> None:
    info = StorageInfo("f.bin", 0, 10, (1, 2), 4)  # 10 bytes in blocks of 4 have 3 crc32c values
    with pytest.raises(ValueError, match="one crc32c per block"):
        LocationColumns.of([MetadataIndex("w", (0,), 0)], [info], [10])


def _placed(md: Any, located: dict[MetadataIndex, StorageInfo]) -> bytes:
    return located_table(
        md, [LocationColumns.of(list(located), list(located.values()), [0] * len(located))], "t"
    ).data


def test_items_are_placed_by_their_offsets_where_their_hint_is_missing_or_wrong(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    torchstow.save({"w": torch.arange(12.0).reshape(4, 3), "b": torch.ones(2)}, str(path))
    md = torchstow.storage_reader(str(path)).read_metadata()
    md.state_dict_metadata["w"].chunks = [  # four chunks of one row each
        ChunkStorageMetadata(torch.Size((row, 0)), torch.Size((1, 3))) for row in range(4)
    ]
    infos = [
        StorageInfo(
            "data-0123456789ab-0-0.bin",
            64 * row,
            12,
            (row,),
            4 << 20,
            f"{row:02x}" * 32 if row % 2 == 0 else None,  # digests on some rows
            "zstd" if row == 1 else None,
        )
        for row in range(4)
    ]
    hinted = {MetadataIndex("w", (row, 0), row): infos[row] for row in range(4)}
    unhinted = {MetadataIndex("w", (row, 0)): infos[row] for row in reversed(range(4))}
    wrong = {MetadataIndex("w", (row, 0), 3 - row): infos[row] for row in range(4)}
    foreign = {**hinted, MetadataIndex("gone", (0,), 0): infos[0], MetadataIndex("w", (9, 0), 1): infos[1]}
    table = _placed(md, hinted)
    assert _placed(md, unhinted) == _placed(md, wrong) == _placed(md, foreign) == table
    md.storage_data = hinted
    md.save_id = "0" * 32
    encoded = encode_manifest(md)
    decoded = decode_metadata(encoded.manifest, read_file=lambda n, _: encoded.tables.get(n))
    assert dict(decoded.storage_data.items()) == hinted
