"""Files that are not what torchstow reads, or hold what it will not run: each is an
error of a documented type naming the file (and the key or global at fault)."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.cli.app import main
from torchstow.interop.sources import open_source


def _safetensors(path: Path, code: str, nbytes: int) -> Path:
    header = json.dumps({"c": {"dtype": code, "shape": [4], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))
    return path


@pytest.mark.parametrize("content", [b"hello world\n", b"", b'{"json": true}'])
def test_a_file_of_another_kind_is_named_with_the_formats_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    for call in (lambda: open_source(str(path)), lambda: torchstow.convert(path, tmp_path / "o", to="torch")):
        with pytest.raises(torchstow.CorruptCheckpointError, match=r"not a torch\.save file") as info:
            call()
        assert str(path) in str(info.value) and "safetensors" in str(info.value)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "not a torch.save file" in err


def test_a_blocked_global_in_a_torch_save_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(torchstow.PickleNotAllowedError) as info:
        torchstow.convert(path, tmp_path / "out", to="torchstow")
    message = str(info.value)
    assert str(path) in message and "argparse.Namespace" in message and "allow_pickle=True" in message
    assert not (tmp_path / "out").exists()


def test_a_complex_safetensors_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    from safetensors.torch import save_file

    value = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    save_file({"c": value}, str(path))
    torchstow.convert(path, tmp_path / "ts", to="torchstow")
    assert torch.equal(torchstow.read(tmp_path / "ts")["c"], value)


def test_an_unknown_safetensors_dtype_names_key_and_file(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "odd.safetensors", "F6_E2M3", 3)  # safetensors has it, torch not
    with pytest.raises(torchstow.FormatVersionError) as info:
        torchstow.convert(path, tmp_path / "ts", to="torchstow")
    assert str(path) in str(info.value) and "'c'" in str(info.value) and "'F6_E2M3'" in str(info.value)
