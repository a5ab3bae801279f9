"""The torchstow command line."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import torchstow
from torchstow.cli import main


@pytest.mark.slow
def test_demo_saves_loads_and_checks(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "loaded state is bit-exact: OK" in out
    assert "manifest.json" in out
    ckpt = os.path.join(str(tmp_path), "step-2")
    assert torchstow.info(ckpt).user_metadata["step"] == 2


def test_info_ls_and_backends(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    torchstow.save({"x": torch.ones(3)}, str(tmp_path / "step-7"), metadata={"k": "v"})
    assert main(["info", str(tmp_path / "step-7")]) == 0
    assert '"k": "v"' in capsys.readouterr().out
    assert main(["ls", str(tmp_path)]) == 0
    assert "step=7" in capsys.readouterr().out
    assert main(["backends"]) == 0
    assert "file" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "torchstow"]
    assert script.value == "torchstow.cli:main"
