"""A version-2 manifest's chunk table as a file of the checkpoint: written before the
manifest, replaced with it, counted by gc, copied, deleted, and readable by every tool."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.format.files import is_chunk_table
from torchstow.testing import assert_same_state


def _tables(path: str | Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if is_chunk_table(n))


def _state(value: float = 1.0) -> dict[str, Any]:
    return {"w": torch.full((64, 8), value), "b": torch.arange(5.0) * value, "step": int(value)}


def test_the_manifest_names_its_own_table_and_an_overwrite_removes_the_replaced_one(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    torchstow.save(_state(1.0), path)
    (first,) = _tables(path)
    doc = json.loads(Path(path, "manifest.json").read_bytes())
    assert doc["chunk_table"]["name"] == first == f"manifest-{doc['save_id']}.chunks"
    torchstow.save(_state(2.0), path, overwrite=True)
    (second,) = _tables(path)
    assert second != first  # named per save: the replaced one went with its data files
    assert_same_state(torchstow.read(path), _state(2.0))
    torchstow.save(_state(3.0), path, overwrite=True, format_version=1)
    assert _tables(path) == []  # a version-1 manifest replacing a version-2 one: its table goes too
    assert_same_state(torchstow.read(path), _state(3.0))


def test_a_table_without_its_manifest_is_an_incomplete_checkpoint_that_gc_removes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    torchstow.save(_state(), str(root / "step-1"))
    killed = root / "step-2"
    killed.mkdir()
    (killed / "manifest-0123abcd.chunks").write_bytes(b"TSCHUNKS")  # a save killed before its commit
    # an orphaned table beside a committed checkpoint (an overwrite killed after its table)
    (root / "step-1" / "manifest-feedbeef.chunks").write_bytes(b"TSCHUNKS")
    with pytest.raises(torchstow.IncompleteCheckpointError):
        torchstow.read(str(killed))
    assert [os.path.basename(c.uri) for c in torchstow.list_checkpoints(str(root))] == ["step-1"]
    young = torchstow.gc(str(root), older_than=3600)
    assert young.removed == [] and len(young.kept) == 2
    time.sleep(1.2)
    report = torchstow.gc(str(root), older_than=1.0)
    assert sorted(report.removed) == [
        f"{root}/step-1/manifest-feedbeef.chunks",
        f"{root}/step-2/manifest-0123abcd.chunks",
    ]
    assert len(_tables(root / "step-1")) == 1  # the committed manifest's own table stays
    assert_same_state(torchstow.read(str(root / "step-1")), _state())


@pytest.mark.parametrize("format_version", [1, 2])
def test_copy_verify_info_and_delete(tmp_path: Path, format_version: int) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    torchstow.save(_state(), src, metadata={"step": 4}, format_version=format_version)
    assert torchstow.verify(src).ok
    torchstow.copy(src, dst)
    info = torchstow.info(dst)
    assert (info.format_version, info.user_metadata, info.num_entries) == (format_version, {"step": 4}, 3)
    assert info.nbytes == torchstow.info(src).nbytes
    assert len(_tables(dst)) == (format_version == 2)
    assert torchstow.verify(dst).ok
    assert_same_state(torchstow.read(dst), _state())
    torchstow.delete(dst)
    assert not os.path.exists(dst)


def test_the_command_line_reads_version_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchstow.cli.app import main

    path = str(tmp_path / "step-7")
    torchstow.save(_state(), path)
    for args in (["info", path, "--json"], ["ls", str(tmp_path), "--json"], ["verify", path]):
        assert main(args) == 0, args
    assert '"format_version": 2' in capsys.readouterr().out
    assert main(["rm", path]) == 0
    assert not os.path.exists(path)


def test_format_version_reaches_async_save_and_the_checkpoint_writer(tmp_path: Path) -> None:
    from torchstow.checkpointing import CheckpointWriter, CheckpointWriterConfig, RankInfo

    torchstow.async_save(_state(), str(tmp_path / "async"), format_version=1).result()
    writer = CheckpointWriter(CheckpointWriterConfig(format_version=1), RankInfo())
    writer.write(str(tmp_path / "writer"), _state())
    writer.close()
    for name in ("async", "writer"):
        assert torchstow.info(str(tmp_path / name)).format_version == 1
        assert _tables(tmp_path / name) == []
        assert_same_state(torchstow.read(str(tmp_path / name)), _state())


def test_a_decoded_table_is_written_again_as_it_is_even_with_its_files_renamed(tmp_path: Path) -> None:
    from torchstow.format.codec import encode_manifest
    from torchstow.format.table import TableLocations

    path = str(tmp_path / "ckpt")
    torchstow.save(_state(), path)
    metadata = torchstow.storage_reader(path).read_metadata()
    (name,) = _tables(path)
    table = Path(path, name).read_bytes()
    assert isinstance(metadata.storage_data, TableLocations)
    metadata.storage_data = metadata.storage_data.renamed({n: "data-x-0-0.bin" for n in os.listdir(path)})
    manifest, tables = encode_manifest(metadata)
    assert list(tables.values()) == [table]  # the same bytes: files are named in the JSON only
    assert not metadata.storage_data._cache, "no location object was made to write it again"
    assert json.loads(manifest)["files"] == ["data-x-0-0.bin"]
