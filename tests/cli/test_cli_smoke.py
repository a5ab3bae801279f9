"""The installed ``torchstow`` command, started as a real process once per verb family: the
console script, its exit statuses and its output on a pipe. What each verb does is tested in
this process through ``main`` (the other test_cli_* files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchstow
from torchstow.format.files import is_data_file

from cli_helpers import run

pytestmark = pytest.mark.slow  # each test starts the command, and so imports torch


@pytest.fixture
def steps(tmp_path: Path) -> Path:
    """A run of two committed checkpoints, step-1 and step-2."""
    for step in (1, 2):
        torchstow.save({"w": torch.full((4,), float(step))}, str(tmp_path / "run" / f"step-{step}"))
    return tmp_path / "run"


def test_ls_info_inspect(steps: Path) -> None:
    listed = run("ls", str(steps))
    assert listed.code == 0, listed.err
    assert [row.split()[-1] for row in listed.out.splitlines()[1:]] == [f"{steps}/step-{s}" for s in (1, 2)]


def test_verify_exits_1_on_a_flipped_byte(steps: Path) -> None:
    bad = steps / "step-2"
    (name,) = [n for n in os.listdir(bad) if is_data_file(n)]
    data = bytearray((bad / name).read_bytes())
    data[0] ^= 0x01
    (bad / name).write_bytes(bytes(data))
    both = run("verify", str(steps / "step-1"), str(bad))
    assert both.code == 1, both.err
    assert both.out.startswith(f"OK       {steps}/step-1 ") and f"CORRUPT  {bad} " in both.out


def test_cp(steps: Path, tmp_path: Path) -> None:
    copied = run("cp", str(steps / "step-2"), str(tmp_path / "copy"))
    assert copied.code == 0, copied.err
    assert copied.out.startswith(f"copied {steps}/step-2 -> {tmp_path / 'copy'} ")
    assert torch.equal(torchstow.read(str(tmp_path / "copy"))["w"], torch.full((4,), 2.0))


def test_prune(steps: Path) -> None:
    pruned = run("prune", str(steps), "--keep-last", "1")
    assert pruned.code == 0, pruned.err
    assert pruned.out.splitlines()[-1] == "deleted 1, kept 1"
    assert [i.step for i in torchstow.list_checkpoints(str(steps))] == [2]


def test_convert(steps: Path, tmp_path: Path) -> None:
    made = run("convert", str(steps / "step-1"), str(tmp_path / "hf"), "--to", "safetensors")
    assert made.code == 0, made.err
    loaded = load_file(str(tmp_path / "hf" / "model-00001-of-00001.safetensors"))
    assert torch.equal(loaded["w"], torch.full((4,), 1.0))


def test_backends() -> None:
    listed = run("backends")
    assert listed.code == 0, listed.err
    assert {line.split()[0] for line in listed.out.splitlines()} >= {"file", "shm", "s3", "faulty"}


def test_demo_saves_loads_and_checks(tmp_path: Path) -> None:
    demo = run("demo", "--path", str(tmp_path))
    assert demo.code == 0, demo.err
    assert "loaded state is bit-exact: OK" in demo.out and "manifest.json" in demo.out
    assert torchstow.info(str(tmp_path / "step-2")).user_metadata["step"] == 2
