"""A separately packaged third-party plugin (examples/third_party_plugin) is pip-installed,
found through its entry point, used through its scheme, and passes the conformance kits."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
import torchstow.spi
from torchstow import UnknownBackendError
from torchstow.plugins.manager import reset_default_registry

from storage_helpers import EXAMPLES, installed_example

EXAMPLE = EXAMPLES / "third_party_plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example installed as a third party would, on sys.path for this module's tests only."""
    with installed_example(EXAMPLE, tmp_path_factory.mktemp("third-party"), "torchstow_sqlite") as target:
        yield target


def _example_conformance_module() -> Any:
    """The plugin's own conformance tests (one line of adoption per kit)."""
    spec = importlib.util.spec_from_file_location(
        "torchstow_sqlite_conformance", EXAMPLE / "tests" / "test_sqlite_conformance.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _installed(plugin_path: Path) -> None:
    """Every test here runs with the plugin installed."""


# The plugin's own conformance classes, collected and run here with the plugin installed.
_example = _example_conformance_module()
TestSqlitePluginConformance = _example.TestSqliteStore
TestSqlitePluginByteStore = _example.TestSqliteByteStore
TestSqlitePluginDistributed = pytest.mark.slow(_example.TestSqliteDistributed)


def test_discovered_from_its_entry_point(plugin_path: Path) -> None:
    entries = {e.scheme: e for e in torchstow.spi.available_backends()}
    entry = entries["sqlite"]
    assert entry.plugin == "sqlite"
    assert entry.version == "0.1.0"
    assert entry.backend.__module__ == "torchstow_sqlite"
    assert Path(sys.modules["torchstow_sqlite"].__file__ or "").is_relative_to(plugin_path)


def test_save_and_load_through_its_scheme(tmp_path: Path) -> None:
    uri = f"sqlite://{tmp_path}/ckpts.db/run1/step-3"
    sd: dict[str, Any] = {"model": {"w": torch.randn(64, 64), "b": torch.zeros(64)}, "step": 3}
    torchstow.save(sd, uri, metadata={"epoch": 1})
    target = {"model": {"w": torch.zeros(64, 64), "b": torch.ones(64)}, "step": None}
    torchstow.load(target, uri)
    assert torch.equal(target["model"]["w"], sd["model"]["w"])
    assert torch.equal(target["model"]["b"], sd["model"]["b"])
    assert target["step"] == 3
    assert torchstow.latest(f"sqlite://{tmp_path}/ckpts.db/run1") == uri
    assert os.path.isfile(tmp_path / "ckpts.db")  # one database file holds it all


def test_a_fresh_process_finds_it_and_the_cli_lists_it(plugin_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "torchstow.cli", "backends"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("sqlite "))
    assert "torchstow_sqlite.SqliteBackend" in line
    assert "torchstow-sqlite 0.1.0" in line


def test_gone_once_uninstalled(plugin_path: Path, tmp_path: Path) -> None:
    sys.path.remove(str(plugin_path))
    reset_default_registry()
    try:
        with pytest.raises(UnknownBackendError, match=r"'sqlite'.*installed schemes: .*file"):
            torchstow.save({}, f"sqlite://{tmp_path}/x.db/a")
    finally:
        sys.path.insert(0, str(plugin_path))
        reset_default_registry()
