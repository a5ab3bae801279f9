"""What lies in a managed root besides torchstow's own checkpoints: stock DCP checkpoints
are pruned, removed and passed over as incremental bases, never silently replaced; a
directory that is no checkpoint is never emptied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow
from torchstow.cli.app import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _dcp_save(path: Path, value: float) -> None:
    dcp.save({"w": torch.full((64,), value), "step": int(value)}, checkpoint_id=str(path), no_dist=True)


def _frozen_state(step: int) -> dict[str, object]:
    return {"frozen": torch.arange(256 * 1024.0), "trainable": torch.full((16,), float(step))}


def test_prune_rm_and_a_manager_delete_dcp_checkpoints_whole(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in (1, 2):
        _dcp_save(root / f"step-{step}", step)
    manager = torchstow.CheckpointManager(root, keep_last=2)
    manager.save(3, {"w": torch.full((64,), 3.0)})  # prunes the DCP step 1
    assert sorted(os.listdir(root)) == ["step-2", "step-3"]
    manager.save(4, {"w": torch.full((64,), 4.0)})
    assert manager.steps() == [3, 4]
    _dcp_save(root / "step-5", 5)
    _dcp_save(root / "step-6", 6)
    assert torchstow.prune(root, keep_last=1) == [str(root / f"step-{s}") for s in (3, 4, 5)]
    assert sorted(os.listdir(root)) == ["step-6"]
    assert main(["rm", str(root / "step-6")]) == 0
    assert os.listdir(root) == []


def test_a_dcp_checkpoint_with_other_files_loses_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "step-1"
    _dcp_save(path, 1)
    (path / "notes.txt").write_text("mine")
    torchstow.delete(path)
    assert os.listdir(path) == ["notes.txt"]


def test_an_incremental_manager_does_not_base_a_save_on_a_dcp_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    manager = torchstow.CheckpointManager(root, keep_last=3, incremental=True)
    manager.save(1, _frozen_state(1))
    _dcp_save(root / "step-2", 2)  # the newest step is DCP's: step 3 is based on step 1
    again = torchstow.CheckpointManager(root, keep_last=3, incremental=True)
    again.save(3, _frozen_state(3))
    assert torchstow.info(again.uri(3)).nbytes_written < 4096
    _dcp_save(root / "step-4", 4)
    for step in (1, 3):  # no torchstow step left to share with
        torchstow.delete(root / f"step-{step}")
    with caplog.at_level("WARNING", logger="torchstow"):
        torchstow.CheckpointManager(root, keep_last=2, incremental=True).save(5, _frozen_state(5))
    assert "DCP-format checkpoint, not a torchstow one" in caplog.text
    assert torchstow.info(again.uri(5)).nbytes_written >= 256 * 1024 * 4
    assert torch.equal(torchstow.read(again.uri(5))["frozen"], torch.arange(256 * 1024.0))


def test_save_copy_and_convert_refuse_a_dcp_checkpoint_without_overwrite(tmp_path: Path) -> None:
    target, source = tmp_path / "step-1", tmp_path / "src"
    _dcp_save(target, 1)
    torchstow.save({"w": torch.zeros(64)}, str(source))
    before = sorted(os.listdir(target))
    with pytest.raises(torchstow.CheckpointException, match="DCP-format checkpoint already exists"):
        torchstow.save({"w": torch.zeros(64)}, str(target))
    with pytest.raises(torchstow.CheckpointExistsError, match="DCP-format checkpoint already exists"):
        torchstow.copy(str(source), str(target))
    with pytest.raises(torchstow.CheckpointExistsError, match="DCP-format checkpoint already exists"):
        torchstow.convert(str(source), str(target), to="dcp")
    assert sorted(os.listdir(target)) == before
    assert torch.equal(torchstow.read(str(target))["w"], torch.full((64,), 1.0))


@pytest.mark.parametrize("how", ["save", "copy"])
def test_replacing_a_dcp_checkpoint_leaves_no_stale_metadata(tmp_path: Path, how: str) -> None:
    target, source = tmp_path / "step-1", tmp_path / "src"
    _dcp_save(target, 1)
    if how == "save":
        torchstow.save({"w": torch.zeros(64)}, str(target), overwrite=True)
    else:
        torchstow.save({"w": torch.zeros(64)}, str(source))
        torchstow.copy(str(source), str(target), overwrite=True)
    names = os.listdir(target)
    assert ".metadata" not in names and not [n for n in names if n.endswith(".distcp")]
    assert torch.equal(torchstow.read(str(target))["w"], torch.zeros(64))
    torchstow.delete(target)  # and no DCP checkpoint comes back from under it
    assert not target.exists()


@pytest.mark.parametrize(
    "manifest", [b'{"name": "my-web-app", "version": "1.0"}', b"not json", b'{"format": "torchstow"}']
)
def test_rm_refuses_a_directory_that_is_no_torchstow_checkpoint(
    tmp_path: Path, manifest: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(manifest)
    (folder / "data-2024-01-1.bin").write_bytes(b"user data")
    refused = (torchstow.CorruptCheckpointError, torchstow.FormatVersionError)  # no version: not one it reads
    with pytest.raises(refused, match="nothing was deleted"):
        torchstow.delete(folder)
    assert main(["rm", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "nothing was deleted" in captured.err and "removed" not in captured.out
    assert sorted(os.listdir(folder)) == ["data-2024-01-1.bin", "manifest.json"]
    (folder / ".metadata").write_bytes(b"not a pickle")  # nor as DCP, without a manifest
    (folder / "manifest.json").unlink()
    with pytest.raises(torchstow.CorruptCheckpointError, match="nothing was deleted"):
        torchstow.delete(folder)
    assert sorted(os.listdir(folder)) == [".metadata", "data-2024-01-1.bin"]


@pytest.mark.parametrize("spelling", ["dot", "dot-dot", "symlink", "file-uri", "relative"])
def test_copy_of_a_dcp_checkpoint_onto_itself_is_refused_and_loses_nothing(
    tmp_path: Path, spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DCP's file names are fixed, so a copy with overwrite withdraws the old checkpoint
    # first: onto itself under another spelling, it deleted the very files it was to read
    src = tmp_path / "run" / "step-1"
    _dcp_save(src, 1)
    before = {n: (src / n).read_bytes() for n in os.listdir(src)}
    monkeypatch.chdir(tmp_path)
    dst = {
        "dot": f"{src}/.",
        "dot-dot": f"{src}/../step-1",
        "symlink": str(tmp_path / "alias"),
        "file-uri": f"file://{src}",
        "relative": "run/step-1",
    }[spelling]
    os.symlink(src, tmp_path / "alias")
    with pytest.raises(ValueError, match="onto itself"):
        torchstow.copy(str(src), dst, overwrite=True)
    assert {n: (src / n).read_bytes() for n in os.listdir(src)} == before
    assert torch.equal(torchstow.read(str(src))["w"], torch.full((64,), 1.0))


def test_a_dcp_copy_that_meets_anothers_data_file_leaves_it(tmp_path: Path) -> None:
    # a DCP save in flight (or killed) at the destination: .distcp files, no .metadata yet
    src, dst = tmp_path / "src", tmp_path / "dst"
    _dcp_save(src, 1)
    dst.mkdir()
    (dst / "__0_0.distcp").write_bytes(b"another save's bytes")
    with pytest.raises(FileExistsError):
        torchstow.copy(str(src), str(dst))
    assert os.listdir(dst) == ["__0_0.distcp"]
    assert (dst / "__0_0.distcp").read_bytes() == b"another save's bytes"


def test_rm_refuses_a_folder_of_data_files_torchstow_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no manifest, no .metadata, and no file named as torchstow names its own: no checkpoint
    # (nor a killed save's leftovers), though the names start with data- and end with .bin
    folder = tmp_path / "dataset"
    folder.mkdir()
    theirs = ["README", "data-2024-01-1.bin", "data-train-0.bin"]
    for name in theirs:
        (folder / name).write_bytes(b"user data")
    with pytest.raises(torchstow.CheckpointNotFoundError, match="nothing was deleted"):
        torchstow.delete(folder, force=True)
    assert main(["rm", str(folder)]) == 1
    assert "nothing was deleted" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == theirs
