"""verify on the formats without checksums (DCP, safetensors): it reads every value,
says so, and reports what is damaged instead of raising."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import torchstow
from torchstow.cli.app import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _dcp(path: Path) -> Path:
    dcp.save(
        {"w": torch.arange(12.0).reshape(4, 3), "v": torch.arange(6), "step": 3}, checkpoint_id=str(path)
    )
    return path


def _hf(path: Path) -> Path:
    path.mkdir()
    save_file({"a.weight": torch.ones(4, 4), "a.bias": torch.zeros(4)}, str(path / "model.safetensors"))
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["verify", "--no-progress", *args])
    return code, capsys.readouterr().out


def test_verify_of_a_healthy_dcp_checkpoint_says_what_it_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _dcp(tmp_path / "dcp")
    report = torchstow.verify(path)
    assert report.ok and report.format == "dcp" and not report.checksums
    assert report.files == 1 and report.keys == 3 and report.checked_bytes == 12 * 4 + 6 * 8
    code, out = _cli(capsys, str(path))
    assert code == 0
    assert "0 files" not in out and "3 values" in out and "1 file" in out and "no checksums" in out


def test_verify_of_a_truncated_distcp_reports_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _dcp(tmp_path / "dcp")
    (data,) = [p for p in path.iterdir() if p.suffix == ".distcp"]
    os.truncate(data, data.stat().st_size - 1)
    report = torchstow.verify(path)
    assert not report.ok
    assert any(p.file == data.name and "truncated" in p.message for p in report.problems)
    assert report.checked_bytes > 0  # what lies before the cut was still read
    code, out = _cli(capsys, "--json", str(path))
    assert code == 1
    (checkpoint,) = json.loads(out)["checkpoints"]
    assert checkpoint["ok"] is False and checkpoint["format"] == "dcp" and checkpoint["problems"]


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"not a pickle at all"])
def test_verify_of_an_unreadable_metadata_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = _dcp(tmp_path / "dcp")
    (path / ".metadata").write_bytes(content)
    report = torchstow.verify(path)
    assert not report.ok
    (problem,) = report.problems
    assert problem.file == ".metadata"
    code, out = _cli(capsys, "--json", str(path))
    assert code == 1 and json.loads(out)["checkpoints"][0]["problems"][0]["file"] == ".metadata"


def test_verify_reads_a_safetensors_folder_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _hf(tmp_path / "hf")
    for target in (folder, folder / "model.safetensors"):
        report = torchstow.verify(target)
        assert report.ok and report.format == "safetensors" and not report.checksums
        assert report.keys == 2 and report.checked_bytes == 16 * 4 + 4 * 4
    code, out = _cli(capsys, str(folder))
    assert code == 0 and "safetensors" in out and "no checksums" in out


def test_verify_reports_a_broken_safetensors_index(tmp_path: Path) -> None:
    folder = _hf(tmp_path / "hf")
    (folder / "model.safetensors.index.json").write_text("{not json")
    report = torchstow.verify(folder)
    assert not report.ok and "model.safetensors.index.json" in report.problems[0].message
