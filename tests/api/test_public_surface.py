"""The public surface: a small top-level namespace for training code, one home per
audience (spi, planning, checkpointing, dcp), and one spelling per concept."""

from __future__ import annotations

import importlib
import inspect

import pytest

import torchstow

HOMES = ["torchstow", "torchstow.spi", "torchstow.planning", "torchstow.checkpointing", "torchstow.dcp"]


def test_the_top_level_namespace_is_small() -> None:
    assert len(torchstow.__all__) <= 40


@pytest.mark.parametrize("home", HOMES)
def test_each_namespace_exports_what_it_lists(home: str) -> None:
    module = importlib.import_module(home)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize(
    "path",
    ["torchstow.core.store", "torchstow.core.backend", "torchstow.core.metadata", "torchstow.core.errors"],
)
def test_the_old_re_export_modules_are_gone(path: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(path)


def test_state_dict_protocol_calls_are_not_public() -> None:
    for name in ("save_state_dict", "load_state_dict"):
        assert not hasattr(torchstow, name)  # DCP deprecates them; save/load(storage_writer=...) instead


OLD_LOCATION_NAMES = {"prefix", "root", "path", "src_uri", "dst_uri", "checkpoint_dir"}


CALLS = [n for n in torchstow.__all__ if inspect.isfunction(getattr(torchstow, n))] + ["CheckpointManager"]


@pytest.mark.parametrize("name", CALLS)
def test_one_spelling_per_concept(name: str) -> None:
    """A location is ``uri`` (``src``/``dst`` for two-sided calls); storage options are one dict."""
    params = inspect.signature(getattr(torchstow, name)).parameters
    assert not OLD_LOCATION_NAMES & set(params), f"{name}: {sorted(OLD_LOCATION_NAMES & set(params))}"
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{name} takes **kwargs"
    if "uri" in params or "src" in params:
        assert [p for p in params if p.endswith("storage_options")], f"{name}: a location, no storage_options"
