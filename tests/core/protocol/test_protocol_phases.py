"""The protocol logs (DEBUG, logger ``torchstow.core.protocol.steps``) how long each
phase of a save and a load took, so a slow checkpoint shows where its time went; a
save's ``SaveStats`` hold the same durations, and its bytes."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow

_PHASE = re.compile(r"^(save|load) (\w+) took (\d+\.\d{3}) s on rank 0$")


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


def _state() -> dict[str, Any]:
    return {"w": torch.arange(1000.0), "opt": {"step": 3, "m": torch.ones(10, dtype=torch.float64)}}


TENSOR_BYTES = 1000 * 4 + 10 * 8


def _logged_seconds(caplog: pytest.LogCaptureFixture) -> dict[str, float]:
    return {
        match[2]: float(match[3])
        for record in caplog.records
        if (match := _PHASE.match(record.getMessage())) and match[1] == "save"
    }


def _check(stats: torchstow.SaveStats, logged: dict[str, float], wall: float, metadata: Any) -> None:
    """The stats hold the phases the log shows, with the logged durations, within the wall time."""
    assert [p for p in stats.seconds if p != "stage"] == ["plan", "coordinate", "write", "commit"]
    assert {p: round(s, 3) for p, s in stats.seconds.items() if p != "stage"} == logged
    assert all(s >= 0 for s in stats.seconds.values())
    assert stats.total_seconds == pytest.approx(sum(stats.seconds.values()))
    assert stats.total_seconds <= wall
    assert stats.bytes_written == TENSOR_BYTES  # the step travels inline, in the manifest
    # The manifest's duration runs from the start to the commit: every phase before it.
    before_commit = sum(s for p, s in stats.seconds.items() if p != "commit")
    assert before_commit <= metadata.save_seconds <= wall


def test_a_sync_save_fills_the_stats_it_is_given(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stats = torchstow.SaveStats()
    start = time.perf_counter()
    with caplog.at_level(logging.DEBUG, logger="torchstow"):
        metadata = torchstow.save(_state(), str(tmp_path / "ckpt"), no_dist=True, stats=stats)
    wall = time.perf_counter() - start
    _check(stats, _logged_seconds(caplog), wall, metadata)
    assert "stage" not in stats.seconds and stats.bytes_staged == 0  # nothing staged
    assert torchstow.info(str(tmp_path / "ckpt")).save_seconds == metadata.save_seconds


def test_an_async_save_has_stats_with_its_staging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    start = time.perf_counter()
    with caplog.at_level(logging.DEBUG, logger="torchstow"):
        saving = torchstow.async_save(_state(), str(tmp_path / "ckpt"), no_dist=True)
        metadata = saving.result(timeout=60)
    wall = time.perf_counter() - start
    stats = saving.stats
    assert next(iter(stats.seconds)) == "stage"
    assert stats.bytes_staged == TENSOR_BYTES
    _check(stats, _logged_seconds(caplog), wall, metadata)
    assert metadata.save_seconds >= stats.seconds["stage"]
