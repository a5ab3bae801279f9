"""Strings that Python holds and UTF-8 cannot: a lone surrogate ("\\ud800") in a key is
refused before anything is written; in a value it round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow


@pytest.mark.parametrize(
    "state",
    [
        {"\ud800": torch.ones(2)},
        {"model": {"w\udfff": torch.ones(2)}, "step": 1},
        {"w": torch.ones(2), "opt": {"\ud800x": 3}},
    ],
)
def test_a_key_with_a_lone_surrogate_is_refused_before_anything_is_written(
    tmp_path: Path, state: dict[str, Any]
) -> None:
    path = tmp_path / "ckpt"
    with pytest.raises(torchstow.CheckpointException, match="lone surrogate") as info:
        torchstow.save(state, path)
    assert "rename the key" in str(info.value)
    assert not path.exists() or not list(path.iterdir())


def test_metadata_with_a_lone_surrogate_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="surrogates not allowed"):
        torchstow.save({"w": torch.ones(2)}, path, metadata={"note": "\ud800"})
    assert not path.exists() or not list(path.iterdir())


def test_a_value_with_a_lone_surrogate_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    state = {"w": torch.ones(2), "name": "run-\ud800", "tags": ["ok", "\udfff", {"\udc80": 1}]}
    torchstow.save(state, path)
    back = torchstow.read(path)
    assert back["name"] == "run-\ud800"
    assert back["tags"] == ["ok", "\udfff", {"\udc80": 1}]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["dcp-planner", "dcp-save"])
def test_a_surrogate_key_from_dcp_planning_is_refused_before_writing(tmp_path: Path, how: str) -> None:
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "ckpt"
    state = {"\ud800": torch.ones(2)}

    def save() -> None:
        if how == "dcp-planner":
            torchstow.save(state, path, planner=dcp.DefaultSavePlanner())
        else:
            dcp.save(state, storage_writer=torchstow.dcp_storage_writer(path), no_dist=True)

    with pytest.raises(BaseException, match="lone surrogate"):  # DCP's CheckpointException is one
        save()
    assert not path.exists() or not list(path.iterdir())
