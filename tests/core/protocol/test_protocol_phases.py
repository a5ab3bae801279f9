"""The protocol logs (DEBUG, logger ``torchstow.core.protocol.steps``) how long each
phase of a save and a load took, so a slow checkpoint shows where its time went."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

import torchstow

_PHASE = re.compile(r"^(save|load) (\w+) took \d+\.\d{3} s on rank 0$")


def _phases(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = []
    for record in caplog.records:
        match = _PHASE.match(record.getMessage())
        if record.name == "torchstow.core.protocol.steps" and match:
            assert record.levelno == logging.DEBUG
            found.append(f"{match[1]} {match[2]}")
    return found


def test_a_sync_save_and_a_load_log_each_phase_with_its_duration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = str(tmp_path / "ckpt")
    state = {"w": torch.arange(6.0), "step": 3}
    with caplog.at_level(logging.DEBUG, logger="torchstow"):
        torchstow.save(state, uri, no_dist=True)
    assert _phases(caplog) == ["save plan", "save coordinate", "save write", "save commit"]
    caplog.clear()
    target = {"w": torch.zeros(6), "step": 0}
    with caplog.at_level(logging.DEBUG, logger="torchstow"):
        torchstow.load(target, uri, no_dist=True)
    assert _phases(caplog) == ["load metadata", "load plan", "load coordinate", "load read"]
    assert torch.equal(target["w"], state["w"])


def test_the_phases_are_quiet_above_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="torchstow"):
        torchstow.save({"w": torch.ones(2)}, str(tmp_path / "ckpt"), no_dist=True)
    assert _phases(caplog) == []
