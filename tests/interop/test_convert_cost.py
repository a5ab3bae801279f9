"""convert's metadata work grows with the number of tensors, not with its square:
the source lists the data files once and checks each stored location a bounded
number of times, however many reads it makes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.format import validation
from torchstow.interop import sources

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TENSORS = 2000


def _state() -> dict[str, Any]:
    return {"model": {f"layer{i}": {"weight": torch.full((3,), float(i))} for i in range(TENSORS)}}


class _Counts:
    """Listings of a local checkpoint folder and location checks against those listings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listings = 0
        self.checks = 0
        for name in ("file_sizes", "list_files"):
            monkeypatch.setattr(LocalFileStore, name, self._listing(getattr(LocalFileStore, name)))
        original = validation.check_extents

        def check_extents(locations: Any, *args: Any, **kwargs: Any) -> set[str]:
            locations = list(locations)
            self.checks += len(locations)
            return original(locations, *args, **kwargs)

        for module in list(sys.modules.values()):  # wherever the name was imported to
            torchstow_module = module is not None and module.__name__.startswith("torchstow")
            if torchstow_module and getattr(module, "check_extents", None) is original:
                monkeypatch.setattr(module, "check_extents", check_extents)

    def _listing(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(store: LocalFileStore) -> Any:
            self.listings += 1
            return method(store)

        return counted


def test_converting_a_2000_tensor_dcp_checkpoint_to_safetensors_does_linear_metadata_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dcp.save(_state(), checkpoint_id=str(tmp_path / "src"), no_dist=True)
    # Every tensor read on its own, as tensors of 16 MiB and more always are.
    monkeypatch.setattr(sources, "_SMALL", 0)
    counts = _Counts(monkeypatch)

    report = torchstow.convert(tmp_path / "src", tmp_path / "out", to="safetensors")

    assert report.tensors == TENSORS
    assert counts.listings <= 5, f"{counts.listings} listings of the source for {TENSORS} tensors"
    assert counts.checks <= 3 * TENSORS, f"{counts.checks} location checks for {TENSORS} tensors"
    (shard,) = (name for name in report.files if name.endswith(".safetensors"))
    with safe_open(shard, framework="pt") as f:
        assert torch.equal(f.get_tensor("model.layer1234.weight"), torch.full((3,), 1234.0))
